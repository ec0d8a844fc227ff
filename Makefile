# The two commands of the README. Both set up .venv themselves (scripts/setup_env.sh).
.PHONY: demo test test-all lint

# Fuse MobileNetV3-Large, check it against native, print the per-layer timing table (GPU if present, else CPU).
demo:
	scripts/setup_env.sh
	.venv/bin/python -m mnet_ext.profile --model mobilenet_v3_large --plot mnet_ext_profile.png

# The test suite (CUDA-marked tests skip with a reason when there is no GPU; exhaustive sweeps are deselected).
# The backends this machine can run are required: a C++ extension or Triton that fails to import fails the run
# (tests/test_backend.py); MNET_EXT_TEST_ALLOW_MISSING=cuda (comma-separated) is the explicit way to run without one.
# The CPU microbenchmark's correctness checks run untimed (bench/test_cpu_microbench.py; testpaths is tests/).
PYTEST_ARGS = tests bench/test_cpu_microbench.py --benchmark-disable
test:
	scripts/setup_env.sh
	.venv/bin/python -m pytest $(PYTEST_ARGS)

# Everything, exhaustive sweeps included.
test-all:
	scripts/setup_env.sh
	.venv/bin/python -m pytest $(PYTEST_ARGS) -m "exhaustive or not exhaustive"

lint:
	.venv/bin/ruff check mnet_ext triton_kernels tests bench setup.py
