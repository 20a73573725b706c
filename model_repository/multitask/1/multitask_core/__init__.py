"""What the served model computes, in plain torch + tokenizers, testable without Triton.

Triton's model.py is a thin adapter over `served.ServedModel`; the build, the tools and the tests open the
same object. Modules: `spec` (what the build decided, read back from the model config), `text`
(normalisation and tokenization), `encoder` (the torch module), `runtimes` (torch, OpenVINO, ONNX Runtime),
`files` (the version folder and its manifest), `served` (the object tying them together).

Nothing is imported here, so that `multitask_core.files` and `multitask_core.text` load without torch.
"""
