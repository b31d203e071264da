"""Test-wide settings: the test models are tiny, so torch runs them on one thread (set RDT_TEST_THREADS
to change). Several threads on a 2-core machine cost far more in synchronisation than they gain here."""

import os

import torch

torch.set_num_threads(int(os.environ.get("RDT_TEST_THREADS", "1")))
