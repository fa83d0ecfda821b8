// One options object, read field by field: for native constructors that take an object instead
// of a list of positional arguments. Each read checks the field's type and range and throws a
// TypeError (RangeError for a number out of range) that names the call and the field, e.g.
// "PostcopyDest: options.uffd must be an integer from 0 to 2147483647, got -1".
#pragma once

#include <napi.h>
#include <cmath>
#include <cstdint>
#include <string>

namespace livemig {

class Options {
 public:
  Options(const Napi::CallbackInfo& info, const char* who) : env_(info.Env()), who_(who) {
    if (info.Length() != 1 || !info[0].IsObject() || info[0].IsArray() || info[0].IsFunction()) {
      throw Napi::TypeError::New(env_, who_ + ": expects one options object");
    }
    o_ = info[0].As<Napi::Object>();
  }

  Napi::Env Env() const { return env_; }

  // The field as it is; undefined when it is absent.
  Napi::Value Optional(const char* name) const { return o_.Get(name); }

  // The field; absent or undefined is an error.
  Napi::Value Required(const char* name) const {
    Napi::Value v = o_.Get(name);
    if (v.IsUndefined()) throw Napi::TypeError::New(env_, Prefix(name) + " is required");
    return v;
  }

  // An integer number within [min, max].
  int64_t Integer(const char* name, int64_t min, int64_t max) const {
    Napi::Value v = Required(name);
    std::string range = "an integer from " + std::to_string(min) + " to " + std::to_string(max);
    if (!v.IsNumber()) throw Bad(name, range);
    double d = v.As<Napi::Number>().DoubleValue();
    if (!std::isfinite(d) || std::trunc(d) != d || d < static_cast<double>(min) || d > static_cast<double>(max)) {
      throw Napi::RangeError::New(env_, Prefix(name) + " must be " + range + ", got " + v.ToString().Utf8Value());
    }
    return static_cast<int64_t>(d);
  }

  Napi::Function Function(const char* name) const {
    Napi::Value v = Required(name);
    if (!v.IsFunction()) throw Bad(name, "a function");
    return v.As<Napi::Function>();
  }

  // A typed array of `type` (napi_uint8_array, napi_biguint64_array, ...), `what` naming it.
  template <typename T>
  T TypedArray(const char* name, napi_typedarray_type type, const char* what) const {
    return CheckTypedArray<T>(name, Required(name), type, what);
  }

  // The same, or an empty handle when the field is absent.
  template <typename T>
  T OptionalTypedArray(const char* name, napi_typedarray_type type, const char* what) const {
    Napi::Value v = Optional(name);
    if (v.IsUndefined()) return T();
    return CheckTypedArray<T>(name, v, type, what);
  }

  // "<who>: options.<name>", for messages of the caller's own checks.
  std::string Prefix(const char* name) const { return who_ + ": options." + name; }

  Napi::TypeError Bad(const char* name, const std::string& expected) const { return Napi::TypeError::New(env_, Prefix(name) + " must be " + expected); }

 private:
  template <typename T>
  T CheckTypedArray(const char* name, const Napi::Value& v, napi_typedarray_type type, const char* what) const {
    if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != type) throw Bad(name, std::string("a ") + what);
    return v.As<T>();
  }

  Napi::Env env_;
  std::string who_;
  Napi::Object o_;
};

}  // namespace livemig
