"""Evaluation: per-case metrics (Dice, IoU, HD95, counts) and nnU-Net-style summary.json files."""

from weightzoo.evaluate.metrics import METRICS, case_metrics, dice, hd95, summarize
from weightzoo.evaluate.summary import evaluate_segmenter, evaluate_slices, summary_line, write_summary

__all__ = [
    "METRICS",
    "case_metrics",
    "dice",
    "evaluate_segmenter",
    "evaluate_slices",
    "hd95",
    "summarize",
    "summary_line",
    "write_summary",
]
