"""Demo and reference data for `flask seed`: groups, official prices, the FAQ."""
from __future__ import annotations

# Official list prices, USD per 1M tokens, as a starting catalog: admins keep them current (and
# add newer models) in Admin → catalog; verify against the providers' price pages before selling.
# (name, provider, kind, input, output, cache write 5m, cache write 1h, cache read,
#  max output tokens, context window)
MODELS = [
    ("gpt-5.1", "openai", "chat", "1.25", "10.00", None, None, "0.125", 128000, 400000),
    ("gpt-5", "openai", "chat", "1.25", "10.00", None, None, "0.125", 128000, 400000),
    ("gpt-5-mini", "openai", "chat", "0.25", "2.00", None, None, "0.025", 128000, 400000),
    ("gpt-4.1", "openai", "chat", "2.00", "8.00", None, None, "0.50", 32768, 1047576),
    ("gpt-4.1-mini", "openai", "chat", "0.40", "1.60", None, None, "0.10", 32768, 1047576),
    ("gpt-4o", "openai", "chat", "2.50", "10.00", None, None, "1.25", 16384, 128000),
    ("gpt-4o-mini", "openai", "chat", "0.15", "0.60", None, None, "0.075", 16384, 128000),
    ("o4-mini", "openai", "chat", "1.10", "4.40", None, None, "0.275", 100000, 200000),
    ("text-embedding-3-small", "openai", "embedding", "0.02", "0", None, None, None, 1, 8191),
    ("text-embedding-3-large", "openai", "embedding", "0.13", "0", None, None, None, 1, 8191),
    ("claude-opus-4-1", "anthropic", "chat", "15.00", "75.00", "18.75", "30.00", "1.50", 32000, 200000),
    ("claude-sonnet-4-5", "anthropic", "chat", "3.00", "15.00", "3.75", "6.00", "0.30", 64000, 1000000),
    ("claude-opus-4-5", "anthropic", "chat", "5.00", "25.00", "6.25", "10.00", "0.50", 64000, 200000),
    ("claude-haiku-4-5", "anthropic", "chat", "1.00", "5.00", "1.25", "2.00", "0.10", 64000, 200000),
]

# Server-side web search fees, USD per search: Anthropic's web_search tool and OpenAI's hosted
# web search tool both list $10 per 1,000 (OpenAI's older web_search_preview on non-reasoning
# models lists $25: set that per model in Admin → catalog if you sell it).
WEB_SEARCH_USD = {name: "0.01" for name, _provider, kind, *_rest in MODELS if kind == "chat"}

# Long-context tiers: (input-side tokens above which a call is priced whole at, input-side
# prices ×, output price ×). Claude Sonnet 4.5 serves 1M tokens with the context-1m beta and
# prices a prompt above 200K at $6 / $22.50 (cache prices scale like input).
LONG_CONTEXT = {"claude-sonnet-4-5": (200_000, "2", "1.5")}

# slug, name, description, multiplier, badge, concurrency, rpm, models (None = all), order
GROUPS = [
    ("recommended", "Recommended 0.3x",
     "Everyday use at the best price: all models, shared capacity.", "0.3", "recommended", 10, 600, None, 0),
    ("dedicated", "Dedicated 1.0x",
     "Official-price capacity reserved for production traffic: higher concurrency and stability.",
     "1.0", "dedicated", 50, 3000, None, 1),
    ("economy", "Economy 0.15x",
     "Small, fast models for bulk work.", "0.15", "none", 5, 300,
     ["gpt-5-mini", "gpt-4.1-mini", "gpt-4o-mini", "claude-haiku-4-5", "text-embedding-3-small"], 2),
]

FAQ = [
    ("what-does-the-multiplier-mean", "What does the 0.3X rate multiplier on a group card mean?",
     "The exchange rate for that group: how much platform balance you spend for every 1 USD of "
     "official model quota consumed.\n\nAt **0.3x**, when the model's official charge is $1 you "
     "consume 0.3 platform balance (≈ ¥0.3); at a real exchange rate of about 7 that is roughly "
     "**4.3%** of the original price. The lower the multiplier, the lower the cost; groups differ, "
     "so choose the one that fits your needs."),
    ("how-is-the-deduction-calculated", "How is the actual deduction calculated?",
     "Actual deduction = official model price (USD) × group rate multiplier.\n\nExample: a call "
     "billed officially at $0.50 in a 0.3x group deducts 0.15 platform balance. Every call's "
     "deduction, with its formula, is in **Usage Records**."),
    ("differences-between-groups", "What are the differences between groups?",
     "- **Rate multiplier**: lower is cheaper.\n- **Supported models**: some groups serve only some "
     "models.\n- **Stability and speed**: concurrency limits and response speeds differ.\n\nDaily use: "
     "the recommended group. High stability needs: a dedicated group."),
    ("multiple-keys", "Can I create multiple Keys?",
     "Yes, on the **API Keys** page, to separate projects or purposes. Each key is managed "
     "independently; all keys share the account balance."),
    ("stability", "How is service stability guaranteed?",
     "Continuous monitoring, capacity planning, fault recovery (failover and automatic recovery), "
     "and performance optimization for high-frequency development use."),
    ("how-to-purchase", "How do I purchase?",
     "Through voucher cards for now (QR-code payment with automatic crediting may come later).\n\n"
     "1. Open the purchase page from **Wallet** in the console, or the purchase link.\n"
     "2. Buy a redemption code.\n3. Redeem it in **Wallet**.\n\nAfter purchase, add the customer "
     "support contact to join the after-sales group."),
    ("invoices", "Can you issue invoices?", "Not at this time."),
    ("after-sales", "After-sales and customer support",
     "Accounts, top-ups, refunds, installation and environment configuration; free technical "
     "guidance. Remote operation assistance costs 30 RMB and needs an appointment."),
    ("which-clients", "Which apps and tools can I use with my key?",
     "Any client of the OpenAI or Anthropic API: set its base URL to this site's `/v1` and use "
     "your key.\n\n- **SDKs**: OpenAI (`base_url=\".../v1\"`) and Anthropic (`base_url=\"...\"`).\n"
     "- **Claude Code**: `ANTHROPIC_BASE_URL` and `ANTHROPIC_API_KEY` (fast mode, `/fast`, works "
     "only for models whose price list on **Pricing** shows a fast mode price).\n"
     "- **Codex CLI**: a model provider with `base_url` and `wire_api = \"responses\"`, or "
     "`OPENAI_BASE_URL`; compressed requests (zstd, gzip) and conversation compaction "
     "(`/v1/responses/compact`) work.\n"
     "- **Chat apps in the browser** may call the API directly with your key (cross-origin "
     "requests are allowed on `/v1`).\n\nPriority (fast) or flex processing (`service_tier`) is offered "
     "only for models whose price list on **Pricing** shows it, at those prices; US-only inference (`inference_geo`) "
     "and background responses are not offered. The **Dashboard** shows the base URL; the models "
     "your key may use are listed at `/v1/models`."),
    ("partial-calls", "What am I charged when a call fails or is cut short?",
     "| what happened | charged |\n|---|---|\n"
     "| the upstream succeeded and reported usage | exactly that usage |\n"
     "| the upstream failed before any output reached you (after retries) | nothing; the record is kept as failed |\n"
     "| you disconnected mid-stream | input tokens (exact if the upstream already reported them, else estimated) + output delivered so far (estimated) + web searches whose results reached you; marked *estimated* |\n"
     "| the upstream reported no usage (or an impossible amount) | estimated from the request and the text delivered; marked *estimated* |\n"
     "| our worker crashed mid-call | settled after the deadline by the same rules; marked |\n\n"
     "While a call runs, its maximum possible cost is *held* (shown as held in your wallet) and "
     "released when it ends, so concurrent calls can never spend money you do not have."),
    ("long-context-prices", "Why does a very long prompt cost more per token?",
     "Some models price a long prompt higher: Claude Sonnet 4.5 with its 1M-token context "
     "(Claude Code's `sonnet[1m]`) charges, for a call whose prompt (input, cache writes and cache "
     "reads together) passes 200,000 tokens, $6 instead of $3 per 1M input tokens and $22.50 "
     "instead of $15 per 1M output tokens, for every token of that call; cache prices double too. "
     "We bill the same tier × your group's multiplier. The **Pricing** page lists each model's "
     "tier, and a usage record priced at it says so."),
    ("web-search-fees", "Are web searches billed?",
     "Yes. When a model searches the web for your call (Claude's `web_search` tool, which Claude "
     "Code's WebSearch uses, or OpenAI's hosted web search in the Responses API), the provider "
     "charges a fee per search on top of the tokens, and so do we, at the official price × your "
     "group's multiplier. The **Pricing** page lists it per 1,000 searches; a usage record shows "
     "its searches in the formula. Failed searches are free.\n\nWhile the call runs, every search "
     "its tools allow is held: the tool's `max_uses` (or the request's `max_tool_calls`), else 10."),
    ("hosted-tools", "Can I use OpenAI's image generation, code interpreter or file search tools?",
     "Not yet. OpenAI charges for each image the `image_generation` tool makes, each "
     "`code_interpreter` container and each `file_search` call, on top of the tokens, and we do not "
     "bill those fees yet. A request that offers one of these tools gets a 400 "
     "`unsupported_parameter` error and costs nothing. Your own function tools, web search and "
     "everything else a coding agent sends work as usual. In Codex CLI, leave "
     "`include_image_gen_tool` off.\n\nFor the same reason Claude's advisor tool and server-side "
     "`fallbacks`, which bring in another model's tokens at its prices, are not offered. Claude's "
     "server-side compaction works; its summarising pass is billed with the call, as Anthropic bills it."),
]
