"""The HTTP service (capture and insights) and the `insightflow` command line."""
