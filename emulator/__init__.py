"""smslab: a lab emulator of an SMS 2.0 site hierarchy over RabbitMQ."""

__version__ = "0.1.0"
