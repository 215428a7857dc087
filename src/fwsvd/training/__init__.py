"""Training: recovery fine-tuning and the losses it and calibration share."""
