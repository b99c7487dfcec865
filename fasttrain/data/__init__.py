"""CIFAR-10 data: conversion to ffcv .beton (convert, sources, manifest) and the training/evaluation loaders
(loaders.build_loaders, with the streaming ffcv mode in ffcv_stream and the GPU-resident mode in gpu_resident).

Submodules are imported explicitly: importing ffcv is slow and changes torch's thread count (see ffcv_compat).
"""
