"""The multitask CXR model. Build or load it only through `build_model` / `load_export`
(cxrfm.model.build): they decide attention backend, kernels, device and dtype in this process."""


def __getattr__(name: str):
    # Lazy: importing a submodule (cxrfm.model.summary, ...) must not pull in transformers and diffusers.
    if name in ("build_model", "load_export"):
        from cxrfm.model import build

        return getattr(build, name)
    raise AttributeError(f"module 'cxrfm.model' has no attribute {name!r}")
