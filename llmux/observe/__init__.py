"""What an operator watches: Prometheus metrics, logs (text or JSON) and `llmux top`."""
