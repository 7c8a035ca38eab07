"""Configurations for the proxies users put in front of several llmux boxes."""
