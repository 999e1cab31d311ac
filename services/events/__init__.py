"""Events for the merchant's backend: see services/events/service.py."""
