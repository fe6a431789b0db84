"""The embedded demo slide: a synthetic H&E generator with exact nuclei ground truth (``make_sample``).

A package so that tests and tools import ``sample_data.make_sample`` from the repository root; the README's
``python sample_data/make_sample.py OUT.tif`` runs it as a script. Not installed with histoseg.
"""
