"""CloudStack: its signed API client (client.py). The platform's spec models, connectors and registry
entry come in the next slice of issue 15; its lab is labs/cloudstack."""
