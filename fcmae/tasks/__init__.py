"""Tasks: FCMAE pretraining, classification, segmentation and detection, each a short loop."""
