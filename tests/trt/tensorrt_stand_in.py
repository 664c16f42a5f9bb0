"""A stand-in for TensorRT's C extension (`tensorrt`), written as `tensorrt/__init__.py` beside
TensorRT's own pure-Python `tensorrt.plugin` sources, so that its decorators and their signature
validators run on the generated module where TensorRT's libraries cannot be installed. Every
attribute is an inert class of its own: nothing is built, registered with TensorRT or launched."""
_classes = {}


class _Meta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _cls(f"{cls.__name__}.{name}")

    def __or__(cls, other):
        return cls

    def __iter__(cls):
        return iter(())


class _Inert(metaclass=_Meta):
    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _cls(name)()

    def __call__(self, *args, **kwargs):
        return _Inert()

    def __iter__(self):
        return iter(())


def _cls(name):
    if name not in _classes:
        _classes[name] = _Meta(name, (_Inert,), {})
    return _classes[name]


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _cls(name)
