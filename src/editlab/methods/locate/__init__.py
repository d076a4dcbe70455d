"""Locate-and-edit methods (ROME, MEMIT and the rest of the family): they find where a fact is stored
(an MLP output projection) and write a new key -> value association there in closed form. Shared
machinery (context templates, keys, value optimisation) lives in `shared.py`."""
