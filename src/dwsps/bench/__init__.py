"""The benchmark client behind ``dwsps bench`` (see :mod:`dwsps.benchmark`)."""
