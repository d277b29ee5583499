import json

from cortex.wire import sse
from cortex.wire.sse import Event, SSEDecoder


def test_encode_json_is_compact_utf8():
    frame = sse.encode({"a": 1, "b": "héllo"})
    assert frame == 'data: {"a":1,"b":"héllo"}\n\n'.encode()


def test_encode_with_event_name():
    assert sse.encode({"type": "ping"}, event="ping") == b'event: ping\ndata: {"type":"ping"}\n\n'


def test_encode_raw_string_and_multiline():
    assert sse.encode("[DONE]") == sse.DONE
    assert sse.encode("a\nb") == b"data: a\ndata: b\n\n"


def test_decoder_round_trip_byte_by_byte():
    frames = [
        sse.encode({"n": 1}, event="message_start"),
        sse.encode({"text": "日本語 ✓"}),
        sse.DONE,
    ]
    stream = b"".join(frames)
    decoder = SSEDecoder()
    events = []
    for i in range(len(stream)):
        events += decoder.feed(stream[i : i + 1])
    assert events == [
        Event("message_start", '{"n":1}'),
        Event(None, '{"text":"日本語 ✓"}'),
        Event(None, "[DONE]"),
    ]
    assert json.loads(events[1].data)["text"] == "日本語 ✓"


def test_decoder_crlf_split_between_cr_and_lf():
    decoder = SSEDecoder()
    assert decoder.feed(b"event: x\r") == []
    assert decoder.feed(b"\ndata: 1\r\n\r") == []
    assert decoder.feed(b"\n") == [Event("x", "1")]


def test_decoder_bare_cr_line_endings():
    assert SSEDecoder().feed(b"data: a\r\rdata: b\r\r\n") == [Event(None, "a"), Event(None, "b")]


def test_decoder_joins_data_lines_and_ignores_comments():
    decoder = SSEDecoder()
    chunk = b": keep-alive\n\nevent: e\ndata: one\n: comment\ndata:two\nid: 7\nretry: 10\n\n"
    assert decoder.feed(chunk) == [Event("e", "one\ntwo")]


def test_decoder_event_without_data_is_not_dispatched_and_resets():
    decoder = SSEDecoder()
    assert decoder.feed(b"event: lonely\n\ndata: x\n\n") == [Event(None, "x")]


def test_decoder_keeps_incomplete_frame():
    decoder = SSEDecoder()
    assert decoder.feed(b"data: partial") == []
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"\n") == [Event(None, "partial")]
