"""3-D volumes: nnU-Net preprocessing, patch training data, sliding-window inference."""
