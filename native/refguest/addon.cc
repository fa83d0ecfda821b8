// The reference guest's native part, an addon of its own (livemig_guest.node): its content and
// write stream (content.cc), its disk (disk.cc) and its end of the control socket (gate.cc). The library's addon
// does not carry it: a real guest brings its own (see docs/GUEST.md once written, and
// src/region/handover.ts for the contract).
#include <napi.h>

namespace livemig {

void InitContent(Napi::Env env, Napi::Object exports);
void InitGate(Napi::Env env, Napi::Object exports);
void InitDisk(Napi::Env env, Napi::Object exports);

}  // namespace livemig

static Napi::Object InitGuestAddon(Napi::Env env, Napi::Object exports) {
  livemig::InitContent(env, exports);
  livemig::InitGate(env, exports);
  livemig::InitDisk(env, exports);
  return exports;
}

NODE_API_MODULE(livemig_guest, InitGuestAddon)
