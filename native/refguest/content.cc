// The reference guest's content and writes, exactly as docs/CONTENT.md defines them.
// Native because it touches every page: filling or verifying 1 GiB in JavaScript BigInt
// arithmetic would take minutes.
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <vector>

#include <algorithm>
#include "common.h"
#include "refguest/gate.h"
#include "wire/format.h"

namespace livemig {

namespace {

constexpr size_t kPage = wire::kPageSize;

// The guest's memory: its mapping's address (a bigint) and size, from the guest's own Region.
// Not a Buffer: a Buffer over a gigabyte counts against V8's external-memory budget and sets
// off garbage collections in the guest, where its heartbeat gap is measured. The reference guest
// passes its live region (src/workload/content.ts checks it) and never releases it while a
// call runs.
struct Memory {
  uint8_t* addr;
  uint64_t size;
};

Memory MemoryOf(const Napi::Value& address, const Napi::Value& size) {
  uint64_t a = ToU64(address);
  uint64_t n = ToU64(size);
  if (a == 0 || a % kPage != 0 || n == 0 || n % kPage != 0)
    throw Napi::RangeError::New(address.Env(), "the guest memory must be a page-aligned mapping of whole pages");
  return {reinterpret_cast<uint8_t*>(a), n};
}

inline uint64_t Mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

inline uint64_t Xs(uint64_t* state) {
  uint64_t x = *state;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  *state = x;
  return x * 0x2545F4914F6CDD1DULL;
}

// ten words a line, as a table
// clang-format off
const char* const kWords[300] = {
    "software",   "read",        "orange",    "experience", "girl",        "turn",       "version",     "relation", "recognize",  "animal",    "other",
    "with",       "network",     "live",      "whatever",   "reference",   "your",       "training",    "tree",     "earth",      "outside",   "between",
    "story",      "change",      "license",   "teacher",    "location",    "particular", "recommend",   "which",    "spell",      "food",      "require",
    "yesterday",  "previous",    "when",      "period",     "night",       "want",       "material",    "world",    "national",   "whether",   "have",
    "mile",       "important",   "violence",  "follow",     "western",     "mother",     "just",        "solution", "television", "move",      "specific",
    "university", "interest",    "show",      "family",     "hard",        "problem",    "evening",     "time",     "until",      "structure", "almost",
    "before",     "close",       "sometimes", "were",       "last",        "really",     "again",       "there",    "respond",    "below",     "within",
    "server",     "often",       "also",      "morning",    "enough",      "management", "land",        "page",     "city",       "strength",  "state",
    "their",      "value",       "produce",   "technology", "might",       "along",      "those",       "market",   "memory",     "feet",      "simple",
    "sentence",   "device",      "vehicle",   "standard",   "printer",     "migration",  "letter",      "four",     "kind",       "remember",  "worker",
    "children",   "public",      "because",   "reason",     "will",        "question",   "negative",    "help",     "history",    "protect",   "mean",
    "provide",    "pressure",    "volume",    "president",  "condition",   "thought",    "instance",    "year",     "pleasure",   "something", "permission",
    "side",       "this",        "register",  "pattern",    "similar",     "probably",   "payment",     "update",   "record",     "control",   "increase",
    "restaurant", "come",        "find",      "wonder",     "checkpoint",  "possible",   "different",   "these",    "manager",    "natural",   "part",
    "popular",    "second",      "need",      "necessary",  "operation",   "system",     "message",     "visitor",  "buffer",     "life",      "counter",
    "platform",   "notice",      "little",    "official",   "screen",      "window",     "information", "present",  "journey",    "well",      "whole",
    "address",    "common",      "response",  "face",       "leave",       "study",      "much",        "book",     "what",       "position",  "mission",
    "being",      "garden",      "most",      "package",    "home",        "thing",      "science",     "open",     "government", "community", "priority",
    "near",       "performance", "keep",      "give",       "original",    "must",       "physical",    "source",   "universe",   "research",  "took",
    "strategy",   "together",    "same",      "stream",     "reduce",      "difference", "start",       "began",    "product",    "reality",   "father",
    "island",     "from",        "plant",     "professor",  "security",    "industry",   "opinion",     "great",    "tonight",    "does",      "idea",
    "harbor",     "first",       "them",      "came",       "treatment",   "learn",      "service",     "quarter",  "tomorrow",   "volunteer", "certain",
    "still",      "temperature", "next",      "another",    "destination", "revenue",    "both",        "been",     "secretary",  "single",    "release",
    "request",    "about",       "each",      "stop",       "work",        "purchase",   "that",        "several",  "like",       "political", "back",
    "around",     "channel",     "picture",   "people",     "went",        "passenger",  "majority",    "pointer",  "place",      "young",     "list",
    "minute",     "minister",    "personal",  "into",       "station",     "good",       "paper",       "later",    "support",    "railway",   "right",
    "they",       "head",        "school",    "such",       "engine",      "word",       "found",       "summer",   "session",    "large",     "down",
    "primary",    "answer",      "watch",
};
// clang-format on

enum Content { kRandom = 0, kZero = 1, kText = 2, kDup = 3, kMixed = 4, kSparse = 5 };

// sparse: one 64 KiB chunk in 16 holds random pages, the rest is never written (holes, as most
// of a real VM's RAM is)
constexpr uint64_t kSparseChunkPages = 16;
constexpr uint64_t kSparseOneIn = 16;

struct Keys {
  uint64_t cls, page, pool, dup;
  explicit Keys(uint64_t s) : cls(Mix64(s ^ 0x636c617373ULL)), page(Mix64(s ^ 0x70616765ULL)), pool(Mix64(s ^ 0x706f6f6cULL)), dup(Mix64(s ^ 0x647570ULL)) {}
};

void RandomWords(uint64_t state, uint8_t* out) {
  for (size_t k = 0; k < kPage / 8; k++) {
    uint64_t v = Xs(&state);
    std::memcpy(out + 8 * k, &v, 8);  // little-endian hosts only (x86-64, arm64)
  }
}

void TextPage(uint64_t state, uint8_t* out) {
  size_t n = 0;
  while (n < kPage) {
    uint64_t x = Xs(&state);
    uint64_t u = x >> 40;
    uint64_t w = ((((u * u) >> 24) * u >> 24) * 300) >> 24;
    uint64_t s = x & 63;
    const char* sep = s < 51 ? " " : s < 56 ? ", " : s < 61 ? ". " : "\n";
    for (const char* p = kWords[w]; *p && n < kPage; p++) out[n++] = static_cast<uint8_t>(*p);
    for (const char* p = sep; *p && n < kPage; p++) out[n++] = static_cast<uint8_t>(*p);
  }
}

inline bool SparseData(const Keys& k, uint64_t i) { return Mix64(k.cls ^ (i / kSparseChunkPages)) % kSparseOneIn == 0; }

void PageContent(int content, const Keys& k, uint64_t i, uint8_t* out) {
  int c = content;
  if (c == kSparse) c = SparseData(k, i) ? kRandom : kZero;
  if (c == kMixed) {
    uint64_t cls = Mix64(k.cls ^ i) % 100;
    c = cls < 35 ? kRandom : cls < 60 ? kZero : cls < 85 ? kText : kDup;
  }
  switch (c) {
    case kRandom: RandomWords(Mix64(k.page ^ i) | 1, out); break;
    case kZero: std::memset(out, 0, kPage); break;
    case kText: TextPage(Mix64(k.page ^ i) | 1, out); break;
    case kDup: RandomWords(Mix64(k.pool ^ (Mix64(k.dup ^ i) % 256)) | 1, out); break;
  }
}

// The guest's write stream. `st` = {xorshift state, write counter}.
struct WriteSpec {
  uint64_t span;    // pages the writes fall in
  bool sequential;  // page = (counter-1) mod span instead of from the stream
};

inline void NextWrite(uint64_t* st, const WriteSpec& w, uint64_t* page, uint64_t* slot, uint64_t* counter) {
  uint64_t r = Xs(&st[0]);
  *counter = ++st[1];
  *page = w.sequential ? (*counter - 1) % w.span : (r >> 9) % w.span;
  *slot = r & 511;
}

Napi::Value Fill(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Memory m = MemoryOf(info[0], info[1]);
  int content = info[2].As<Napi::Number>().Int32Value();
  uint64_t seed = ToU64(info[3]);
  uint64_t pages = m.size / kPage;
  return Task<int>::Start(
      env,
      [m, content, seed, pages](int&, SysError&) {
        Keys k(seed);
        for (uint64_t i = 0; i < pages; i++) {
          if (content == kSparse && !SparseData(k, i)) continue;  // a hole stays a hole
          PageContent(content, k, i, m.addr + i * kPage);
        }
      },
      [](Napi::Env e, int&) -> Napi::Value { return e.Undefined(); }, {info[0]});
}

// guestWrite(region, st: BigUint64Array[2+], n, span, sequential) -> writes done: up to n,
// fewer when the guest is paused meanwhile.
Napi::Value GuestWrite(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Memory m = MemoryOf(info[0], info[1]);
  uint64_t* st = info[2].As<Napi::BigUint64Array>().Data();
  uint64_t n = ToU64(info[3]);
  WriteSpec w{ToU64(info[4]), info[5].ToBoolean().Value()};
  if (w.span == 0 || w.span > m.size / kPage) throw Napi::RangeError::New(env, "span outside the region");
  // In chunks through the gate: a pause waits for at most one chunk, and no write follows it.
  // A chunk is short: each write to a page whose write protection was re-armed faults, ~60 us
  // on a host that is itself a VM, and the pause waits for all of a chunk's.
  GuestGate& g = TheGuestGate();
  uint64_t done = 0;
  while (done < n && !g.pausing) {
    std::lock_guard<std::mutex> lock(g.mu);
    if (g.paused) break;
    for (uint64_t end = std::min(n, done + 16); done < end; done++) {
      uint64_t page, slot, counter;
      NextWrite(st, w, &page, &slot, &counter);
      std::memcpy(m.addr + page * kPage + slot * 8, &counter, 8);
    }
  }
  return Napi::Number::New(env, static_cast<double>(done));
}

struct VerifyResult {
  uint64_t bad = 0;
  int64_t firstBad = -1;
};

// verifyModel(region, content, seed, writes, span, sequential) -> {bad, firstBad}
// Rebuilds what every page must hold after `writes` writes from the start of the stream and
// compares. The last value written to each (page, slot) is found by replaying the stream.
Napi::Value Verify(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Memory m = MemoryOf(info[0], info[1]);
  int content = info[2].As<Napi::Number>().Int32Value();
  uint64_t seed = ToU64(info[3]);
  uint64_t writes = ToU64(info[4]);
  WriteSpec w{ToU64(info[5]), info[6].ToBoolean().Value()};
  uint64_t pages = m.size / kPage;
  if (w.span == 0 || w.span > pages) throw Napi::RangeError::New(env, "span outside the region");
  return Task<VerifyResult>::Start(
      env,
      [m, content, seed, writes, w, pages](VerifyResult& out, SysError&) {
        // A check in the background must not take the CPU from the guest's own work (its
        // heartbeat on a 2-core host): run this thread at the lowest priority while it lasts.
        pid_t tid = static_cast<pid_t>(syscall(SYS_gettid));
        int before = getpriority(PRIO_PROCESS, tid);
        setpriority(PRIO_PROCESS, tid, 19);
        // pages touched by the stream, and for each the slots' last values
        std::vector<int64_t> firstSlotIdx(pages, -1);
        std::vector<uint64_t> slots;  // 512 words per touched page
        uint64_t st[2] = {Mix64(seed) | 1, 0};
        for (uint64_t k = 0; k < writes; k++) {
          uint64_t page, slot, counter;
          NextWrite(st, w, &page, &slot, &counter);
          if (firstSlotIdx[page] < 0) {
            firstSlotIdx[page] = static_cast<int64_t>(slots.size());
            slots.resize(slots.size() + 512, 0);
          }
          slots[firstSlotIdx[page] + slot] = counter;
        }
        Keys k(seed);
        uint8_t expect[kPage];
        for (uint64_t i = 0; i < pages; i++) {
          PageContent(content, k, i, expect);
          if (firstSlotIdx[i] >= 0) {
            for (int s = 0; s < 512; s++) {
              uint64_t v = slots[firstSlotIdx[i] + s];
              if (v) std::memcpy(expect + 8 * s, &v, 8);
            }
          }
          if (std::memcmp(expect, m.addr + i * kPage, kPage) != 0) {
            if (out.firstBad < 0) out.firstBad = static_cast<int64_t>(i);
            out.bad++;
          }
        }
        setpriority(PRIO_PROCESS, tid, before);
      },
      [](Napi::Env e, VerifyResult& r) -> Napi::Value {
        Napi::Object o = Napi::Object::New(e);
        o.Set("bad", Napi::Number::New(e, static_cast<double>(r.bad)));
        o.Set("firstBad", Napi::Number::New(e, static_cast<double>(r.firstBad)));
        return o;
      },
      {info[0]});
}

Napi::Value Mix(const Napi::CallbackInfo& info) { return Napi::BigInt::New(info.Env(), Mix64(ToU64(info[0]))); }

}  // namespace

void InitContent(Napi::Env env, Napi::Object exports) {
  exports.Set("contentFill", Napi::Function::New(env, Fill));
  exports.Set("guestWrite", Napi::Function::New(env, GuestWrite));
  exports.Set("contentVerify", Napi::Function::New(env, Verify));
  exports.Set("mix64", Napi::Function::New(env, Mix));
}

}  // namespace livemig
