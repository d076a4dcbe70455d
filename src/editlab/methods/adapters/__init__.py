"""Methods that add parameters beside a kept base layer (GRACE, MELO, WISE, T-Patcher, CaliNET). They share
one injection mechanism, `inject.py`: a wrapper module that keeps the original as `base_layer`."""
