"""Locust users, headless scenarios and the throughput tuner (not built yet: see the README's status)."""
