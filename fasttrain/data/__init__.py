"""CIFAR-10 data: conversion to ffcv .beton (convert, sources, manifest) and the training/evaluation loaders
(loaders.build_loaders, with the streaming mode in stream and the device-resident mode in resident).

Submodules are imported explicitly: importing ffcv is slow and changes torch's thread count (see ffcv_compat).
"""
