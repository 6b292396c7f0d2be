"""Shapes shared by the dataflow and the API: events, requests, responses, dates, keys."""
