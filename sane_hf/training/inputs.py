"""The inputs of a training run, checked before anything is written: zoo, tokenizer, permutation spec.

:func:`_prepare_zoo` loads a zoo folder or ``DatasetDict`` (raw or tokenized), refuses zoos that
cannot work (missing or empty splits, mixed architectures, token sizes that disagree) and
tokenizes a raw zoo; :func:`_permutation_spec` derives the architecture's spec for permutation
views; :func:`_check_model_fits` checks the model's window and position tables against the zoo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sane_hf.constants import ZOO_CONFIG_FILE

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    from accelerate import Accelerator

    from sane_hf.alignment import PermutationSpec
    from sane_hf.configuration_sane import SaneConfig
    from sane_hf.tokenization_sane import WeightTokenizer
    from sane_hf.training.config import SaneTrainingConfig
    from sane_hf.zoo.dataset import ZooConfig

__all__: list[str] = []  # internal to the training loop


@dataclass
class _PreparedZoo:
    zoo: Any  # DatasetDict, tokenized
    tokenizer: WeightTokenizer
    zoo_config: ZooConfig | None
    zoo_config_path: Path | None
    num_tokens: int
    token_size: int


def _load_zoo_any(path: Path) -> datasets.DatasetDict:
    from sane_hf.zoo.dataset import load_zoo

    if not path.exists():
        raise FileNotFoundError(f"zoo folder {str(path)!r} does not exist")
    if (path / "dataset_dict.json").exists():  # DatasetDict.save_to_disk (e.g. a tokenized zoo)
        import datasets

        return datasets.load_from_disk(str(path))
    return load_zoo(path)


def _prepare_zoo(
    zoo: Any,
    tokenizer: WeightTokenizer | str | os.PathLike | None,
    token_size: int,
    zoo_config: ZooConfig | None,
    training_config: SaneTrainingConfig,
    accelerator: Accelerator,
) -> _PreparedZoo:
    """Load, check and (if raw) tokenize the zoo; returns the tokenized splits and the tokenizer."""
    import datasets

    from sane_hf.data import token_shape
    from sane_hf.tokenization_sane import TOKENIZER_FILE, WeightTokenizer
    from sane_hf.zoo.dataset import fit_tokenizer_on_zoo, iter_state_dicts, load_zoo_config, tokenize_zoo

    zoo_config_path = None
    if isinstance(zoo, (str, os.PathLike)):
        path = Path(zoo)
        data = _load_zoo_any(path)
        if (path / ZOO_CONFIG_FILE).is_file():
            zoo_config_path = path / ZOO_CONFIG_FILE
            if zoo_config is None:
                zoo_config = load_zoo_config(path)
        if tokenizer is None and (path / TOKENIZER_FILE).is_file() and "tokens" in data["train"].column_names:
            tokenizer = path
    elif isinstance(zoo, datasets.DatasetDict):
        data = zoo
    else:
        raise TypeError(
            f"zoo must be a zoo folder path or a datasets.DatasetDict (raw or tokenized), got {type(zoo).__name__}"
        )
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = WeightTokenizer.from_pretrained(tokenizer)

    needed = ["train"] + ([training_config.eval_split] if training_config.eval_split else [])
    for split in needed:
        if split not in data:
            raise ValueError(f"the zoo has no {split!r} split (splits: {list(data)})")
        if len(data[split]) == 0:
            hint = "" if split == "train" else " (or set eval_split=None to train without validation)"
            raise ValueError(f"the zoo's {split!r} split is empty: nothing to train on{hint}")
    from sane_hf.zoo.loading import check_single_architecture

    check_single_architecture(data, "SANE trains on one architecture per tokenizer")
    splits = datasets.DatasetDict({s: data[s] for s in needed})

    if "tokens" in splits["train"].column_names:  # already tokenized
        if tokenizer is None:
            raise ValueError(
                "the zoo is already tokenized but no tokenizer was given: pass the WeightTokenizer it was made "
                "with (tokenizer=..., or --tokenizer), or train on the raw zoo"
            )
        n, d = token_shape(splits["train"])
        if (n, d) != (tokenizer.num_tokens, tokenizer.token_size):
            raise ValueError(
                f"the tokenized zoo holds {n} tokens of size {d} per checkpoint but the tokenizer makes "
                f"{tokenizer.num_tokens} tokens of size {tokenizer.token_size}: pass the tokenizer it was made with"
            )
        for s in needed[1:]:
            if token_shape(splits[s]) != (n, d):
                raise ValueError(f"split {s!r} has tokens of shape {token_shape(splits[s])}, train has {(n, d)}")
    else:
        if "weights" not in splits["train"].column_names:
            raise ValueError("the zoo has neither 'weights' (raw) nor 'tokens' (tokenized) columns: not a zoo")
        if tokenizer is not None and tokenizer.token_size != token_size:
            raise ValueError(
                f"the tokenizer's token size is {tokenizer.token_size} but the model's config.token_size is "
                f"{token_size}; they must agree"
            )
        with accelerator.main_process_first():
            if tokenizer is None:
                tokenizer = fit_tokenizer_on_zoo(splits, token_size=token_size, split="train")
            elif not tokenizer.is_fitted:
                tokenizer.fit(iter_state_dicts(splits["train"]))
            splits = tokenize_zoo(splits, tokenizer, normalize=True, keep_weights=False)
    if tokenizer.token_size != token_size:
        raise ValueError(
            f"the zoo's tokens have size {tokenizer.token_size} but the model's config.token_size is {token_size}; "
            f"build the model with token_size={tokenizer.token_size} (or tokenize the zoo with token_size={token_size})"
        )
    n, d = token_shape(splits["train"])
    return _PreparedZoo(splits, tokenizer, zoo_config, zoo_config_path, n, d)


def _permutation_spec(zoo_config: ZooConfig | None) -> tuple[PermutationSpec | None, str]:
    """The spec of the zoo's architecture, or (None, why not)."""
    if zoo_config is None:
        return None, "the zoo has no zoo_config.json naming its architecture (pass permutation_spec=...)"
    from sane_hf.zoo.architectures import list_architectures, permutation_spec_for_arch

    if getattr(zoo_config, "arch_entrypoint", None):  # the user's module: derived from its graph likewise
        from sane_hf.alignment import permutation_spec
        from sane_hf.zoo.custom import architecture_builder, zoo_task

        try:
            module = architecture_builder(zoo_config)()  # an unimportable entry point raises ValueError here
        except ValueError as err:
            raise ValueError(f"the zoo's architecture cannot be built: {err}") from err
        try:
            task = zoo_task(zoo_config)
            example = task.x_train[:2] if task is not None else None
            return permutation_spec(module, example), ""
        except Exception as err:  # noqa: BLE001 - any failure just means "no permutation views"
            return None, (f"deriving the permutation spec of {zoo_config.arch!r} from its module graph failed "
                          f"({type(err).__name__}: {err})")
    if zoo_config.arch not in list_architectures():
        return None, (f"architecture {zoo_config.arch!r} is not in the registry (import the zoo with "
                      "--arch module:callable, or pass permutation_spec=...)")
    try:
        return permutation_spec_for_arch(zoo_config.arch, **zoo_config.model_kwargs()), ""
    except Exception as err:  # noqa: BLE001 - any failure just means "no permutation views"
        return None, f"deriving the permutation spec of {zoo_config.arch!r} failed ({type(err).__name__}: {err})"


def _check_model_fits(config: SaneConfig, tokenizer: WeightTokenizer, num_tokens: int) -> None:
    if config.window_size > num_tokens:
        raise ValueError(
            f"the model's window_size ({config.window_size}) is larger than the sequences of this zoo "
            f"({num_tokens} tokens per checkpoint); use a SaneConfig with window_size <= {num_tokens} "
            "(and halo_size < window_size / 2)"
        )
    if config.position_encoding != "learned-tables":
        return  # the sinusoid-projection position code has no upper bound
    max_rows = max((layer.num_rows for layer in tokenizer.layers), default=0)
    if tokenizer.num_layers > config.max_positions[1] or max_rows > config.max_positions[2]:
        raise ValueError(
            f"the zoo's networks have {tokenizer.num_layers} layers and up to {max_rows} rows per layer but the "
            f"model's position tables hold {config.max_positions[1]} layers and {config.max_positions[2]} rows; "
            "raise SaneConfig.max_positions"
        )


