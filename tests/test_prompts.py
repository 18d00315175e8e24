"""The LM worker's prompts (chat turns from protos, image expansion) against the published template (jinja)."""

import jinja2
import pytest

from gemma3serve.v1 import common_pb2, lm_worker_pb2
from lm_worker.prompts import InvalidRequest, PromptBuilder, chat_text
from tests import gemma_tokenizer
from tests.test_processing import GEMMA3_CHAT_TEMPLATE


def render(messages):
    env = jinja2.Environment()
    env.globals["raise_exception"] = lambda m: (_ for _ in ()).throw(ValueError(m))
    template = env.from_string(GEMMA3_CHAT_TEMPLATE)
    return template.render(messages=messages, bos_token="<bos>", add_generation_prompt=True)


def to_proto(messages):
    turns = []
    for m in messages:
        parts = [common_pb2.ContentPart(text=c["text"]) if c["type"] == "text"
                 else common_pb2.ContentPart(image=common_pb2.Image(embedding_key="k")) for c in m["content"]]
        turns.append(common_pb2.Turn(role=m["role"], parts=parts))
    return turns


CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "text", "text": "  Hello there \n"}]}],
    [{"role": "system", "content": [{"type": "text", "text": "Be brief. "}]},
     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text",
                                                                                          "text": " and "},
                                  {"type": "image"}]},
     {"role": "assistant", "content": [{"type": "text", "text": "The first is red."}]},
     {"role": "user", "content": [{"type": "text", "text": "And the second?"}]}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_text_equals_the_published_template(messages):
    assert chat_text(to_proto(messages)) == render(messages)


def test_roles_must_alternate_like_the_template():
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}]},
                {"role": "user", "content": [{"type": "text", "text": "b"}]}]
    with pytest.raises(ValueError, match="alternate"):
        render(messages)
    with pytest.raises(InvalidRequest, match="alternate"):
        chat_text(to_proto(messages))


def test_images_expand_into_soft_tokens_and_pan_and_scan_text(tmp_path):
    tok = gemma_tokenizer.write(str(tmp_path))
    builder = PromptBuilder(tok, mm_tokens_per_image=4, hidden_size=8, stop_token_ids=[1])
    request = lm_worker_pb2.LMGenerateRequest(raw=common_pb2.RawPrompt(text="A<start_of_image>B<start_of_image>"))
    ids, types = builder.build(request, [0, 2])
    text = tok.decode(ids, skip_special_tokens=False)
    full = "\n\n<start_of_image>" + "<image_soft_token>" * 4 + "<end_of_image>\n\n"
    expected = ("<bos>A" + full + "B" + "Here is the original image " + full
                + " and here are some crops to help you see better " + " ".join([full] * 2))
    assert text == expected
    assert types.sum() == 4 * (1 + 3) and ids[0] == tok.token_to_id("<bos>")
    with pytest.raises(InvalidRequest, match="2 image placeholders but 1 images"):
        builder.build(request, [0])
