"""Functional checks beside the perf ones, with the official openai SDK."""


def test_completion_returns_requested_tokens(infmax_openai, infmax_server):
    out = infmax_openai.completions.create(
        model=infmax_server.model,
        prompt="The capital of France is",
        max_tokens=8,
        extra_body={"ignore_eos": True},
    )
    assert out.usage.completion_tokens == 8


def test_chat_streams_with_usage(infmax_openai, infmax_server):
    stream = infmax_openai.chat.completions.create(
        model=infmax_server.model,
        messages=[{"role": "user", "content": "Say hi"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 6
