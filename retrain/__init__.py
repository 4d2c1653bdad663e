"""retrain: train an image classifier on your own folders of photos by transfer learning.

The library under the `retrain` command. Everything is imported on first use, so
`import retrain` stays light (no torch, no onnxruntime) and `retrain label` starts fast.

    import retrain

    report = retrain.fit(retrain.FitConfig(image_dir="flower_photos", output="runs/flowers"))
    print(report["metrics"]["test"]["accuracy"])

    clf = retrain.Classifier("runs/flowers")               # any run folder or model.onnx
    probs, errors = clf.classify_files(["daisy.jpg"])      # (n, classes) probabilities
    print(clf.top_k(probs[0], 3))

    retrain.label("runs/flowers", ["daisy.jpg", "more_photos/"])   # what `retrain label` prints
    retrain.evaluate("runs/flowers", "held_out_photos/")["accuracy"]
    retrain.export("runs/flowers", "onnx-int8", "runs/flowers-int8")  # verified on the run's photos
    retrain.Run("runs/flowers").report()                   # the run folder's files
"""

__version__ = "0.1.0"

# public name -> module that defines it. fit, label, evaluate and export are modules named after
# their commands; each is callable as its main function (see callable_module), so that
# `retrain.fit(cfg)` works whether or not `retrain.fit` was imported as a module first.
_API = {
    "fit": "retrain.fit",
    "label": "retrain.label",
    "evaluate": "retrain.evaluate",
    "export": "retrain.export",
    "FitConfig": "retrain.config",
    "Classifier": "retrain.classifier",
    "Run": "retrain.run",
    "RetrainError": "retrain.errors",
}
_COMMAND_MODULES = ("fit", "label", "evaluate", "export")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        module = importlib.import_module(_API[name])
        return module if name in _COMMAND_MODULES else getattr(module, name)
    raise AttributeError(f"module 'retrain' has no attribute '{name}'")


def callable_module(module_name: str, fn) -> None:
    """Make module `module_name` callable as `fn` (retrain.fit(cfg) is retrain.fit.fit(cfg)).
    Importing a submodule sets it as an attribute of the package, over any function of that
    name, so the module itself is what answers the call."""
    import sys
    import types

    class _CallableModule(types.ModuleType):
        __doc__ = fn.__doc__

        def __call__(self, *args, **kwargs):
            return fn(*args, **kwargs)

    sys.modules[module_name].__class__ = _CallableModule


def __dir__():
    return sorted(__all__)
