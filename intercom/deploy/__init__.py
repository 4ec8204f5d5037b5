"""Deployment: first-boot provisioning and signed update bundles."""
