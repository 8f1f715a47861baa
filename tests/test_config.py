import pytest
import yaml

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


def test_config_yaml_redacts_tokens_keys_passwords_and_url_credentials():
    cfg = load_config(None, [
        "eval.judge_options={token: hf_T1, access_token: A2, hf_token: hf_T3, openai_key: sk-4, credentials: C5,"
        " password: P6, base_url: 'https://bob:P7@host.example/v1', max_tokens: 16, max_tokens_total: 900,"
        " max_output_tokens: 32, token_param: max_tokens, api_key_env: MY_KEY, api_key_file: keys/judge}",
        "data.path=https://user:P8@data.example/pairs.jsonl"])
    text = dump_config(cfg)  # what config.yaml holds
    for secret in ("hf_T1", "A2", "hf_T3", "sk-4", "C5", "P6", "bob", "P7", "P8"):
        assert secret not in text, secret
    opts = yaml.safe_load(text)["eval"]["judge_options"]
    assert [k for k, v in opts.items() if v == "***"] == ["token", "access_token", "hf_token", "openai_key",
                                                          "credentials", "password"]
    assert opts["base_url"] == "https://***@host.example/v1"
    assert {k: opts[k] for k in ("max_tokens", "max_tokens_total", "max_output_tokens", "token_param", "api_key_env",
                                 "api_key_file")} == {"max_tokens": 16, "max_tokens_total": 900, "max_output_tokens": 32,
                                                      "token_param": "max_tokens", "api_key_env": "MY_KEY",
                                                      "api_key_file": "keys/judge"}
    assert yaml.safe_load(text)["data"]["path"] == "https://***@data.example/pairs.jsonl"
    assert cfg.eval.judge_options["token"] == "hf_T1"  # the run itself still gets the value


def test_fingerprints_record_no_secret_and_ignore_a_rotated_key():
    from compo.core import fingerprint

    cfg = load_config(None, ["zo.oracle.options={api_key: sk-S1, base_url: 'https://bob:P2@h.example/v1', rule: strict}",
                             "data.path=https://user:P3@data.example/pairs.jsonl"])
    fp = fingerprint.current(cfg, "stage2")  # what run directories and study cells record
    text = repr(fp)
    for secret in ("sk-S1", "bob", "P2", "user", "P3"):
        assert secret not in text, secret
    assert fp["zo.oracle.options.api_key"] == "***" and fp["zo.oracle.options.rule"] == "strict"
    assert fp["data.path#sha256"] == "name:https://***@data.example/pairs.jsonl"
    old = {**fp, "zo.oracle.options.api_key": "sk-OLD"}  # recorded raw by an older compo
    assert fingerprint.differences(old, fp) == []
    assert fingerprint.differences({**fp, "zo.oracle.options.rule": "relaxed"}, fp) == ["zo.oracle.options.rule"]


def test_every_option_has_a_description():
    rows = reference_table()
    assert len(rows) > 60
    assert all(desc for _, _, desc in rows)


def test_the_reference_lists_the_keys_of_optional_sections():
    rows = {k: (d, desc) for k, d, desc in reference_table()}
    assert rows["stage1.peft"][0] == "None"
    assert {k: d for k, (d, _) in rows.items() if k.startswith("stage1.peft.")} == {
        "stage1.peft.enabled": "True", "stage1.peft.r": "16", "stage1.peft.alpha": "32.0",
        "stage1.peft.dropout": "0.05", "stage1.peft.target_modules": "'all-linear'"}
    assert {k for k in rows if k.startswith("zo.accept_oracle")} == {
        "zo.accept_oracle", "zo.accept_oracle.name", "zo.accept_oracle.options"}
    keys = [k for k, _, _ in reference_table()]
    assert keys.index("stage1.peft") + 1 == keys.index("stage1.peft.enabled")  # each under its section


def test_config_list_shows_the_lora_keys(capsys):
    from compo.cli import main

    assert main(["config", "--list"]) == 0
    out = capsys.readouterr().out
    for key in ("stage1.peft.r", "stage1.peft.alpha", "stage1.peft.dropout", "stage1.peft.target_modules",
                "stage1.peft.enabled", "zo.accept_oracle.name", "logging.run_name"):
        assert f"\n  {key} " in out, key


def test_readme_config_reference_is_current():
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "scripts"))
    from update_readme import table

    reference = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "config.md").read_text()
    assert table() in reference, "run: python scripts/update_readme.py"
