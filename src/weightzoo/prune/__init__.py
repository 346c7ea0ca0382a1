"""Pruning measured the ShrinkBench way (docs/prune.md).

    from weightzoo.prune.model import PruneRecipe, prune_and_finetune
    pruned, info = prune_and_finetune(load_model("model/"), PruneRecipe("global-magnitude", ratio=8,
                                      finetune_steps=200), "pruned/", train_slices, val_slices)

strategies  masking strategies, one `score` method each (global/layer magnitude and gradient, random)
structured  channel groups of a PlainConvUNet; removing channels gives a smaller PlainConvUNet
metrics     sizes, FLOPs (checked against torch.utils.flop_counter), paired latency
model       a recipe -> a pruned, fine-tuned model folder (route "prune", recipe in model.json)
bench       every method x target x seed with one budget; report: table, curves, report.html
"""
