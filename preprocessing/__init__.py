"""Turning raw cases into training-ready arrays, and the raw-layout converters."""
