import pytest

from compo.config import ConfigError, dump_config, load_config, reference_table


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("stage1:\n  beta: 0.3\nzo:\n  m: 8\n")
    cfg = load_config(p, ["stage1.beta=0.2", "zo.oracle.options.rule=relaxed", "split.delta=1.5"])
    assert cfg.stage1.beta == 0.2 and cfg.zo.m == 8 and cfg.split.delta == 1.5
    assert cfg.zo.oracle.options == {"rule": "relaxed"}


def test_unknown_key_names_the_key_and_allowed_keys(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("stage1:\n  betta: 0.3\n")
    with pytest.raises(ConfigError, match=r"stage1\.betta: unknown key; allowed keys here: .*beta"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"unknown key 'bogus' in zo; allowed: .*radius"):
        load_config(None, ["zo.bogus=1"])


def test_bad_value_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"stage1\.loss: Input should be 'dpo', 'ipo', 'hinge', 'robust', 'kto' or 'bco'"):
        load_config(None, ["stage1.loss=sft"])
    with pytest.raises(ConfigError, match=r"zo\.m: Input should be greater than 0"):
        load_config(None, ["zo.m=0"])


def test_secrets_are_redacted_in_dumps():
    cfg = load_config(None, ["zo.oracle.options.api_key=sk-SECRET-1", "zo.oracle.options.api_key_env=MY_KEY"])
    text = dump_config(cfg)
    assert "sk-SECRET-1" not in text and "MY_KEY" in text


def test_every_option_has_a_description():
    rows = reference_table()
    assert len(rows) > 60
    assert all(desc for _, _, desc in rows)


def test_readme_config_reference_is_current():
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "scripts"))
    from update_readme import table

    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert table() in readme, "run: python scripts/update_readme.py"
