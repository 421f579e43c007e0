"""Offline task data for supervised fine-tuning after continued pretraining (see `translation`)."""
