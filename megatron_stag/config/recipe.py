"""Recipes: YAML training configs in sections, with inheritance and command-line overrides.

A recipe is a mapping of sections (model, parallelism, training, optimizer, data, checkpoint,
logging) whose keys are Megatron's own argument names (`dest`s: `num_layers`, `micro_batch_size`,
`lr`, `data_path`, ...) plus ours (`stag_*`, `altup_*`, `core_attention`). `base: other.yaml` inherits
from another recipe (resolved next to the recipe, then in the packaged recipes folder) and deep-merges
over it. Overrides are `section.key=value` or `key=value` (the section is looked up), values in YAML
syntax. Validation checks every section and key against Megatron's and our argument parser and every
value by parsing it, before anything is launched; errors name the recipe file and key.

The result is an argv list for Megatron's parser, never a shell string.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_stag.platform.shipped import shipped_dir

SECTIONS = ("model", "parallelism", "training", "optimizer", "data", "checkpoint", "logging")
# keys that are ours rather than Megatron flags: {section: {key: (type, help)}}
PLUGIN_KEYS = {
    "model": {"core_attention": "sdpa (torch SDPA, default) or local (megatron's DotProductAttention)"},
    "parallelism": {"nproc_per_node": "processes per node launched by `megatron-stag pretrain`"},
    "logging": {"log_file": "also write the job's output here (default: <save>/train.log)"},
}
LAUNCHER_KEYS = {"nproc_per_node", "log_file"}
RECIPE_DIRS = [shipped_dir("recipes")]


class RecipeError(ValueError):
    """A recipe problem; the message names the file and key and says how to fix it."""


@dataclass
class Recipe:
    sections: dict[str, dict[str, Any]]
    sources: list[Path] = field(default_factory=list)

    def get(self, key: str, default=None):
        for values in self.sections.values():
            if key in values:
                return values[key]
        return default

    def set(self, key: str, value) -> None:
        """Set `key` in the section that holds it (or the section given as `section.key`)."""
        section, key = _split_key(key, self)
        self.sections.setdefault(section, {})[key] = value


def packaged_recipes() -> list[str]:
    return sorted(p.stem for d in RECIPE_DIRS if d.is_dir() for p in d.glob("*.yaml") if p.stem != "common")


def find_recipe(name: str | Path) -> Path:
    path = Path(name)
    candidates = [path] + [d / path for d in RECIPE_DIRS] + [d / f"{path}.yaml" for d in RECIPE_DIRS]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = packaged_recipes()
    raise RecipeError(f"recipe {str(name)!r} not found (looked in ., {', '.join(map(str, RECIPE_DIRS))}); "
                      f"packaged recipes: {', '.join(known)}.")


def _read(path: Path, seen: tuple[Path, ...]) -> tuple[dict, list[Path]]:
    path = path.resolve()
    if path in seen:
        raise RecipeError(f"{path}: inheritance cycle through {' -> '.join(p.name for p in seen)}.")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections ({', '.join(SECTIONS)}).")
    base = data.pop("base", None)
    merged, sources = {}, []
    if base is not None:
        local = path.parent / base
        merged, sources = _read(local if local.is_file() else find_recipe(base), seen + (path,))
    for section, values in data.items():
        if section not in SECTIONS:
            raise RecipeError(f"{path}: unknown section {section!r}; sections are {', '.join(SECTIONS)}.")
        if not isinstance(values, dict):
            raise RecipeError(f"{path}: section {section!r} must be a mapping of key: value.")
        merged.setdefault(section, {}).update(copy.deepcopy(values))
    return merged, sources + [path]


def _split_key(dotted: str, recipe: Recipe) -> tuple[str, str]:
    if "." in dotted:
        section, key = dotted.split(".", 1)
        if section not in SECTIONS:
            raise RecipeError(f"override {dotted!r}: unknown section {section!r}; sections are "
                              f"{', '.join(SECTIONS)}.")
        return section, key
    holders = [s for s, values in recipe.sections.items() if dotted in values]
    if holders:
        return holders[0], dotted
    for section, keys in PLUGIN_KEYS.items():
        if dotted in keys:
            return section, dotted
    return _guess_section(dotted), dotted


def _guess_section(key: str) -> str:
    """Where a new key goes when the recipe does not have it yet (only affects how it is shown)."""
    if key.startswith(("stag_", "altup_", "num_", "hidden", "ffn", "seq_length", "max_position",
                       "position_", "normalization", "moe_")):
        return "model"
    if key.endswith("_parallel_size") or key == "sequence_parallel":
        return "parallelism"
    if key.startswith(("save", "load", "pretrained_checkpoint")):
        return "checkpoint"
    if key.startswith(("log", "tensorboard", "eval")):
        return "logging"
    if key.startswith(("lr", "min_lr", "weight_decay", "adam", "clip", "optimizer")):
        return "optimizer"
    if key.startswith(("data", "split", "tokenizer", "vocab")):
        return "data"
    return "training"


# keys whose values are paths: taken literally (YAML would read ' #' as a comment and ': ' as a mapping,
# so a run directory such as "/shared/runs/exp #3" would silently become "/shared/runs/exp")
LITERAL_KEYS = ("save", "load", "pretrained_checkpoint", "tokenizer_model", "log_file", "tensorboard_dir")


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise RecipeError(f"override {text!r}: write key=value (e.g. training.train_iters=100).")
    key, value = text.split("=", 1)
    if key.strip().rsplit(".", 1)[-1] in LITERAL_KEYS:
        return key.strip(), value
    try:
        return key.strip(), yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as err:
        raise RecipeError(f"override {text!r}: value is not valid YAML: {err}") from None


def load_recipe(name: str | Path, overrides: list[str] = ()) -> Recipe:
    """The recipe with its overrides. Where the recipe resumes from the folder it saves to (load ==
    save) and only save is overridden, load follows it: a run given a new folder starts fresh there
    (or resumes its own checkpoints) instead of loading the recipe's default folder, another run's."""
    sections, sources = _read(find_recipe(name), ())
    recipe = Recipe(sections, sources)
    tied = recipe.get("load") is not None and recipe.get("load") == recipe.get("save")
    given = set()
    for text in overrides:
        key, value = parse_override(text)
        recipe.set(key, value)
        given.add(key.rsplit(".", 1)[-1])
    if tied and "save" in given and "load" not in given:
        recipe.set("load", recipe.get("save"))
    return recipe


# ---------------------------------------------------------------------------- argv for Megatron
def megatron_parser() -> argparse.ArgumentParser:
    """Megatron's full argument parser plus ours: the reference every recipe key is checked against."""
    from megatron.training.arguments import add_megatron_arguments

    from megatron_stag.config.cli_args import add_stagformer_args

    parser = argparse.ArgumentParser(allow_abbrev=False, exit_on_error=False)
    parser = add_megatron_arguments(parser)
    return add_plugin_args(add_stagformer_args(parser))


def add_plugin_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("megatron-stag")
    group.add_argument("--core-attention", dest="core_attention", choices=("sdpa", "local"),
                       default="sdpa", help=PLUGIN_KEYS["model"]["core_attention"])
    return parser


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    out = {}
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            out.setdefault(action.dest, action)
    return out


def _flag_args(key: str, value, action: argparse.Action, where: str) -> list[str]:
    flag = action.option_strings[0]
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: {key} is a switch; use true or false, not {value!r}.")
        wanted = isinstance(action, argparse._StoreTrueAction)
        return [flag] if value == wanted else []
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        if action.nargs not in ("+", "*") and not isinstance(action.nargs, int):
            raise RecipeError(f"{where}: {key} takes one value, not a list.")
        return [flag] + [str(v) for v in value]
    if isinstance(value, dict):
        raise RecipeError(f"{where}: {key} takes a value, not a mapping.")
    return [flag, str(value)]


# Megatron's ranges that its parser does not check: out of them a run fails deep in a rank (a bare
# assert, a division by zero, a negative tensor dimension, SIGFPE in the dataset index) or, for sizes
# of 0, reads them as unset. {key: (lowest, highest or None)}, both allowed
BOUNDS = {
    **dict.fromkeys((
        "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
        "seq_length", "max_position_embeddings", "make_vocab_size_divisible_by", "num_experts", "moe_router_topk",
        "micro_batch_size", "global_batch_size", "train_iters", "train_samples", "lr_decay_iters", "exit_interval",
        "tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
        "expert_model_parallel_size", "num_layers_per_virtual_pipeline_stage", "save_interval", "log_interval",
        "eval_interval", "tensorboard_log_interval"), (1, None)),
    **dict.fromkeys(("lr_warmup_iters", "eval_iters", "num_workers", "seed", "lr", "min_lr", "weight_decay",
                     "clip_grad", "init_method_std"), (0, None)),
    **dict.fromkeys(("hidden_dropout", "attention_dropout"), (0, 1)),
}


def _check_bounds(key: str, value, where: str) -> None:
    low, high = BOUNDS[key]
    if value < low or (high is not None and value > high):
        wanted = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise RecipeError(f"{where}: {key}={value!r} is out of range: use a value {wanted}.")


def recipe_argv(recipe: Recipe, parser: argparse.ArgumentParser | None = None) -> list[str]:
    """The Megatron argv of a recipe; every key and value is checked by parsing it (and against
    `BOUNDS`)."""
    parser = parser or megatron_parser()
    actions = _actions(parser)
    where_base = recipe.sources[-1].name if recipe.sources else "recipe"
    argv = []
    for section, values in recipe.sections.items():
        for key, value in values.items():
            where = f"{where_base} [{section}]"
            if key in LAUNCHER_KEYS:
                continue  # launcher settings, not Megatron arguments
            if key not in actions:
                hint = _close_keys(key, actions)
                raise RecipeError(f"{where}: unknown key {key!r}: not a Megatron or megatron-stag "
                                  f"argument{hint}. Keys are argument names with underscores "
                                  f"(--num-layers -> num_layers).")
            args = _flag_args(key, value, actions[key], where)
            try:
                parsed, _ = parser.parse_known_args(args)
            except (argparse.ArgumentError, SystemExit) as err:
                raise RecipeError(f"{where}: {key}={value!r} is not accepted: {err}") from None
            if key in BOUNDS and getattr(parsed, key) is not None:
                _check_bounds(key, getattr(parsed, key), where)
            argv += args
    return argv


def with_flags(recipe: Recipe, flags: list[str], parser: argparse.ArgumentParser | None = None) -> Recipe:
    """A copy of `recipe` holding the values of raw Megatron flags (`-- --flag value`, which win over the
    recipe in the run), for the checks to see what the run will use."""
    if not flags:
        return recipe
    parser = parser or megatron_parser()
    try:
        given = vars(parser.parse_known_args(flags)[0])
    except (argparse.ArgumentError, SystemExit) as err:
        raise RecipeError(f"-- {' '.join(flags)}: {err}") from None
    defaults = vars(parser.parse_known_args([])[0])
    out = Recipe(copy.deepcopy(recipe.sections), list(recipe.sources))
    for key, value in given.items():
        if value != defaults.get(key):
            out.set(key, value)
    return out


def model_parallel_sizes(recipe: Recipe) -> tuple[int, int, int]:
    """(tensor, pipeline, context) parallel sizes: their product is one model replica's ranks."""
    return tuple(int(recipe.get(f"{k}_parallel_size") or 1) for k in ("tensor_model", "pipeline_model", "context"))


def check_world(recipe: Recipe, world: int, ranks: str, change: str) -> int:
    """Megatron's data-parallel size for `world` ranks (described to the user as `ranks`), or a
    RecipeError saying what to change (`change`): megatron asserts both in every rank, after start-up."""
    tp, pp, cp = model_parallel_sizes(recipe)
    if world % (tp * pp * cp):
        raise RecipeError(f"{ranks} = {world} ranks is not a multiple of tensor x pipeline x context parallel = "
                          f"{tp} x {pp} x {cp} = {tp * pp * cp}: change {change} or the recipe's parallelism.")
    dp = world // (tp * pp * cp)
    mbs, gbs = int(recipe.get("micro_batch_size") or 1), recipe.get("global_batch_size")
    if gbs is not None and int(gbs) % (mbs * dp):
        raise RecipeError(f"training.global_batch_size={gbs} is not a multiple of micro_batch_size x data-parallel "
                          f"size = {mbs} x {dp}: set training.global_batch_size to a multiple of {mbs * dp}.")
    return dp


def _close_keys(key: str, actions: dict) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(actions), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""
