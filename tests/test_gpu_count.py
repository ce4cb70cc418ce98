"""Per-GPU figures use the GPUs the simulator models (issue 15).

With ``--profile b200/gpt-oss-120b --tp 2`` and no ``num_gpus=``, the simulator modelled
two GPUs (TPOT 3.95 -> 2.39 ms) while throughput per GPU and cost were computed for one:
both 2x off, without a word. The simulator now says how many GPUs it models (/sim/stats)
and the launcher uses that count; a ``num_gpus=`` that disagrees is an error.
"""

from __future__ import annotations

import pytest

TP2 = "--profile b200/gpt-oss-120b --tp 2"


def test_per_gpu_figures_use_the_simulators_gpu_count(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_perf=f"""
        import pytest
        from pytest_infmax import Scenario

        @pytest.mark.infmax_server(sim_args="{TP2}")
        def test_tp2(infmax, infmax_server):
            assert infmax_server.num_gpus == 2
            r = infmax.run(Scenario("tiny", 64, 16), concurrency=2, num_requests=4, warmup=0)
            assert r.num_gpus == 2 and r.server["num_gpus"] == 2
            m = r.metrics
            assert m.throughput_per_gpu == pytest.approx(m.throughput / 2)
            assert r.cost.total == pytest.approx(r.price.usd_per_gpu_hour * 2 / (m.throughput * 3600) * 1e6)
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_a_conflicting_num_gpus_is_an_error_naming_both(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_perf=f"""
        import pytest

        @pytest.mark.infmax_server(sim_args="{TP2}", num_gpus=1)
        def test_tp2(infmax):
            infmax.run("1k1k-mini", concurrency=1, num_requests=1)
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*num_gpus=1 conflicts with the simulator, which models 2 GPUs (--profile b200/gpt-oss-120b --tp 2)*"]
    )


def test_without_a_profile_the_configured_count_stands(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_perf="""
        import pytest

        @pytest.mark.infmax_server(num_gpus=4)
        def test_four(infmax_server):
            assert infmax_server.num_gpus == 4  # the default simulator models no GPU
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_the_simulator_says_what_it_models_and_nothing_else_parses_its_flags(tmp_path) -> None:
    """Issue 15: --profile was parsed three ways (by the simulator, by the price chooser and by the
    energy check). Now only the simulator reads its flags; the launcher asks it (/sim/stats)."""
    import re
    from pathlib import Path

    from pytest_infmax.servers.launch import ServerConfig, running_server

    with running_server(ServerConfig(sim_args=("--profile=b200/gpt-oss-120b", "--tp", "2")), tmp_path) as server:
        assert (server.modelled_gpus, server.modelled_hardware, server.modelled_power) == (2, "b200", True)
    with running_server(ServerConfig(sim_args=("--decode-step-ms", "2")), tmp_path) as plain:
        assert (plain.modelled_gpus, plain.modelled_hardware, plain.modelled_power) == (None, None, False)
    package = Path(__file__).resolve().parents[1] / "pytest_infmax"
    parsers = [
        p.relative_to(package).as_posix()
        for p in package.rglob("*.py")
        if not p.relative_to(package).as_posix().startswith("sim/")
        and re.search(r"""["']--profile["'=]""", p.read_text())
    ]
    assert parsers == [], f"these read the simulator's --profile themselves: {parsers}"
