# Clients written for Azure OpenAI's image deployments, against a running server started with
# --api-key KEY: the `openai` SDK's AzureOpenAI (as Microsoft's quickstarts use it) with a
# deployment per call and bound to one, Azure's v1 API through the plain OpenAI client, and the
# errors (a wrong key, an unknown deployment).
#
#   python3 -m venv /tmp/az && /tmp/az/bin/pip install openai pillow
#   /tmp/az/bin/python -W ignore scripts/bench/azure_clients.py http://localhost:8000 KEY
#
# Prints one line per client: what it got, or the exception.
import base64, sys, time, urllib.request
from openai import AzureOpenAI, OpenAI
base, key = sys.argv[1], sys.argv[2]

def attempt(name, fn):
    t = time.time()
    try:
        got = fn()
    except Exception as e:
        got = "%s: %s" % (type(e).__name__, str(e)[:150])
    print("%s: %s (%.1f s)" % (name, got, time.time() - t))

az = AzureOpenAI(azure_endpoint=base, api_key=key, api_version="2024-10-21", max_retries=0)
def dalle3():
    r = az.images.generate(model="dall-e-3", prompt="a white siamese cat", n=1, size="1024x1024")
    return "url ok, %d bytes" % len(urllib.request.urlopen(r.data[0].url).read())
attempt("AzureOpenAI deployment dall-e-3, generate", dalle3)
def gptimage():
    r = az.images.generate(model="gpt-image-1", prompt="a white siamese cat", size="1024x1024")
    return "b64 ok, %d bytes" % len(base64.b64decode(r.data[0].b64_json))
attempt("AzureOpenAI deployment gpt-image-1, generate", gptimage)
def edit():
    import io
    from PIL import Image
    buf = io.BytesIO(); Image.new("RGB", (256, 256), (200, 30, 30)).save(buf, "PNG")
    r = az.images.edit(model="gpt-image-1", image=("in.png", buf.getvalue(), "image/png"), prompt="in winter", size="256x256")
    return "b64 ok, %d bytes" % len(base64.b64decode(r.data[0].b64_json))
attempt("AzureOpenAI deployment gpt-image-1, edit", edit)
bound = AzureOpenAI(azure_endpoint=base, azure_deployment="gpt-image-1", api_key=key, api_version="2025-04-01-preview", max_retries=0)
attempt("AzureOpenAI bound to a deployment, generate", lambda: "b64 ok, %d bytes" % len(base64.b64decode(bound.images.generate(model="ignored", prompt="a cat", size="256x256").data[0].b64_json)))
v1 = OpenAI(base_url=base + "/openai/v1/", api_key=key, max_retries=0)
attempt("Azure v1 API (OpenAI client), generate", lambda: "b64 ok, %d bytes" % len(base64.b64decode(v1.images.generate(model="gpt-image-1", prompt="a cat", size="256x256").data[0].b64_json)))
bad = AzureOpenAI(azure_endpoint=base, api_key="wrong", api_version="2024-10-21", max_retries=0)
attempt("AzureOpenAI wrong key", lambda: bad.images.generate(model="dall-e-3", prompt="x"))
attempt("AzureOpenAI unknown deployment", lambda: az.images.generate(model="my-sdxl", prompt="x"))
