# Clients written for DALL·E, against a running server: OpenAI's quickstart (`images.generate`
# with a DALL·E model and no response_format, then `data[0].url`) at DALL·E 2's and 3's sizes,
# and LangChain's DallEAPIWrapper (langchain-community), which joins the `url`s it gets back.
#
#   python3 -m venv /tmp/lc && /tmp/lc/bin/pip install openai langchain-community
#   /tmp/lc/bin/python -W ignore scripts/bench/dalle_clients.py http://localhost:8000
#
# Prints one line per client: what it got (`url=None`, `url ok, BYTES`, or the exception).
import sys, time, urllib.request
from openai import OpenAI
base = sys.argv[1]
c = OpenAI(base_url=base + "/v1", api_key="x")
for model, size in (("dall-e-3", "1024x1024"), ("dall-e-2", "512x512"), ("dall-e-3", "1792x1024")):
    t = time.time()
    try:
        r = c.images.generate(model=model, prompt="a white siamese cat", n=1, size=size)
        url = r.data[0].url
        got = "url=None" if url is None else "url ok, %d bytes" % len(urllib.request.urlopen(url).read())
    except Exception as e:
        got = "%s: %s" % (type(e).__name__, str(e)[:160])
    print("quickstart %s %s: %s (%.1f s)" % (model, size, got, time.time() - t))
import os
os.environ["OPENAI_API_KEY"] = "x"
from langchain_community.utilities.dalle_image_generator import DallEAPIWrapper
w = DallEAPIWrapper(base_url=base + "/v1", model="dall-e-2", size="512x512")
t = time.time()
try:
    out = w.run("a white siamese cat")
    print("langchain DallEAPIWrapper: %s (%.1f s)" % (out[:100], time.time() - t))
except Exception as e:
    print("langchain DallEAPIWrapper: %s: %s (%.1f s)" % (type(e).__name__, str(e)[:160], time.time() - t))
