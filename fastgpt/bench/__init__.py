"""The measurements behind `fastgpt bench` and `fastgpt gpu-report`: every backend against eager
PyTorch and the machine's own limit, interleaved, with the environment beside the numbers."""
