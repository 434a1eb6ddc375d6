"""Fine-tuning: training data, personal-data redaction, trainer process, backends and export."""
