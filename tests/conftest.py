import os

# Keep each rank to one intra-op thread: the suite runs several gloo ranks per core.
os.environ.setdefault("OMP_NUM_THREADS", "1")
