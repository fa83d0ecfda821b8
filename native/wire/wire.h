// The migration stream's Wire (wire.cc), as other native modules see it.
#pragma once

#include <memory>

#include "common.h"
#include "io/link.h"

namespace livemig {

// The connection a JavaScript Wire holds (a post-copy service takes it over); throws if the
// value is not a Wire or the Wire is closed.
std::shared_ptr<Link> LinkOfWire(Napi::Env env, Napi::Value wire);

}  // namespace livemig
