"""What a checkpoint's config may hold: every field's type and range, checked before a model is
built from it, so a bad value fails with one message naming the field (checkpoint.py adds the
file) instead of a traceback at load or a 500 at the first request.

`check_pcgpt_config` checks a pcgpt directory's config.json; `check_model_args` the model
arguments of any format (pcgpt's model_args, nanoGPT's model_args, HF GPT-2's renamed fields).
Unknown model arguments are ignored, as GPTConfig.from_dict ignores them (nanoGPT forks add
some), and so are unknown keys of `eval` (evaluations add their own figures); unknown keys of
`sampler` are refused, since a misspelt one would be silently ignored.
"""

import math
import re


class ConfigFieldError(ValueError):
    """One field of a checkpoint's config that is wrong: `field` names it ("model_args.n_head")."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


def _integer(field, value, low, high=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigFieldError(field, f"must be an integer, found {value!r}")
    if value < low or (high is not None and value > high):
        raise ConfigFieldError(field, f"must be in [{low}, {high if high is not None else '∞'}], found {value}")
    return value


def _number(field, value, low=-math.inf, high=math.inf, low_open=False, high_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigFieldError(field, f"must be a finite number, found {value!r}")
    if value < low or value > high or (low_open and value == low) or (high_open and value == high):
        bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigFieldError(field, f"must be in {bounds}, found {value}")
    return value


def _boolean(field, value):
    if not isinstance(value, bool):
        raise ConfigFieldError(field, f"must be true or false, found {value!r}")
    return value


def _choice(field, value, choices):
    if value not in choices:
        raise ConfigFieldError(field, f"must be one of {', '.join(map(repr, choices))}, found {value!r}")
    return value


def _object(field, value):
    if not isinstance(value, dict):
        raise ConfigFieldError(field, f"must be an object, found {type(value).__name__}")
    return value


# model argument -> its check; the bounds are sanity limits (no real GPT comes near them), there
# so that a typo cannot ask for a petabyte position table
GPT_ARGS = {
    "block_size": lambda f, v: _integer(f, v, 1, 1 << 20),
    "vocab_size": lambda f, v: _integer(f, v, 1, 1 << 24),
    "n_layer": lambda f, v: _integer(f, v, 1, 4096),
    "n_head": lambda f, v: _integer(f, v, 1, 4096),
    "n_embd": lambda f, v: _integer(f, v, 1, 1 << 17),
    "dropout": lambda f, v: _number(f, v, 0.0, 1.0, high_open=True),
    "bias": _boolean,
    "gelu_approximate": lambda f, v: _choice(f, v, ("none", "tanh")),
}
PC_ARGS = {
    **GPT_ARGS,
    "generator_rank": lambda f, v: _integer(f, v, 0, 1 << 17),
    "alpha": lambda f, v: _number(f, v, 0.0, 100.0, low_open=True),
    "default_settle_steps": lambda f, v: _integer(f, v, 0, 1024),
    "max_settle_steps": lambda f, v: _integer(f, v, 0, 1024),
    "rho_max": lambda f, v: _number(f, v, 0.0, 50.0, low_open=True),
    "early_stop": lambda f, v: _number(f, v, 0.0, 1.0, high_open=True),
}
MODEL_ARGS = {"gpt": GPT_ARGS, "pc": PC_ARGS}

# the error-driven sampler's defaults a checkpoint may carry (pcgpt.model.sampling.ErrorDrivenParams)
SAMPLER = {
    "tau": lambda f, v: _number(f, v, 0.0, 64.0, low_open=True),
    "eta": lambda f, v: _number(f, v, 0.0, 10.0),
    "lam": lambda f, v: _number(f, v, 0.0, 10.0),
    "m0": lambda f, v: v if v is None else _number(f, v),
}
EVAL = {
    "val_loss": lambda f, v: _number(f, v, 0.0),
    "train_loss": lambda f, v: _number(f, v, 0.0),
    "split": lambda f, v: v if isinstance(v, str) else _fail(f, f"must be a string, found {v!r}"),
}
SAVED_AT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")


def _fail(field, problem):
    raise ConfigFieldError(field, problem)


def check_model_args(model_type: str, args, prefix: str = "model_args.", names: dict | None = None) -> None:
    """Every known argument's type and range, then the ones that depend on each other.
    `names` maps an argument to what the file calls it (HF GPT-2's n_positions)."""
    names = names or {}
    label = lambda key: prefix + names.get(key, key)  # noqa: E731
    _object(prefix.rstrip(".") or "config", args)
    schema = MODEL_ARGS[model_type]
    for key, check in schema.items():
        if key in args:
            check(label(key), args[key])
    if "n_embd" in args and "n_head" in args and args["n_embd"] % args["n_head"]:
        raise ConfigFieldError(label("n_embd"), f"{args['n_embd']} is not divisible by n_head {args['n_head']}")
    if model_type == "pc":
        default, most = args.get("default_settle_steps", 1), args.get("max_settle_steps", 16)
        if default > most:
            raise ConfigFieldError(label("default_settle_steps"), f"{default} is more than max_settle_steps {most}")


def check_pcgpt_config(config: dict, format_version: int, model_types) -> None:
    """A pcgpt config.json (model_args and the blocks the server reads); the tokenizer spec is
    checked by building the tokenizer."""
    for key in ("model_type", "model_args", "tokenizer"):
        if key not in config:
            raise ConfigFieldError(key, "missing")
    if "format_version" in config:
        _integer("format_version", config["format_version"], 1, format_version)
    if config["model_type"] not in model_types:
        raise ConfigFieldError("model_type", f"unknown model type {config['model_type']!r}; "
                                             f"this server knows {sorted(model_types)}")
    check_model_args(config["model_type"], config["model_args"])
    _object("tokenizer", config["tokenizer"])
    if "saved_at" in config and not (isinstance(config["saved_at"], str) and SAVED_AT.fullmatch(config["saved_at"])):
        raise ConfigFieldError("saved_at", f"must be a UTC time as YYYY-MM-DDTHH:MM:SSZ, found {config['saved_at']!r}")
    if "created" in config:  # OpenAI's name for it: Unix seconds
        _integer("created", config["created"], 0)
    for block, schema in (("sampler", SAMPLER), ("eval", EVAL)):
        if config.get(block) is None:
            continue
        values = _object(block, config[block])
        for key, value in values.items():
            if key not in schema and block == "sampler":
                raise ConfigFieldError(f"{block}.{key}", f"unknown key; known: {', '.join(schema)}")
            if key in schema:
                schema[key](f"{block}.{key}", value)
    if "training" in config and config["training"] is not None:
        _object("training", config["training"])
