"""Placeholder demo: lists the available conv variants."""

import dynconv

print(dynconv.list_convs())
