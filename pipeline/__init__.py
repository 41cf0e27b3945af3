"""regtok's data plumbing: shards, images, encoders, HDF5 feature stores and manifests.

Importing this package must stay cheap (no torch), so that `regtok --help` is instant.
"""
