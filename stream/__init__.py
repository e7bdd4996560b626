"""stream: River online learners fed by Kafka event streams."""

__version__ = "0.1.0"
