// The migration stream's data path. After the handshake a TCP connection's descriptor is
// handed to a Wire (a dup of it, switched to blocking mode) and every byte moves here, on
// thread-pool threads with no JavaScript inside:
//   - sendPages: PAGES frames written with sendmsg from a copy of each batch read out of the
//     region's files (region/file_io.h), each page hashed right after it went, while it is
//     still in cache;
//   - read: frames parsed as a state machine that waits for exactly the bytes it needs
//     (header, then prefix, then indices, then data); with a page sink, PAGES frames are
//     checked, received, hashed and written to the region's file, and the first other frame
//     is returned to JavaScript with its payload;
//   - write: control frames, gathered.
// One read and one write may run at once (TCP allows it); TypeScript serialises the rest.
// Validation messages match src/protocol (frame.ts decodeHeader, messages.ts decodePages).
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <ctime>
#include <memory>
#include <string>
#include <vector>

#include "codec/encode.h"
#include "codec/pagehash.h"
#include "common.h"
#include "io/link.h"
#include "io/socket.h"
#include "region/region.h"
#include "wire/format.h"
#include "wire/receive_pages.h"
#include "wire/send_pages.h"
#include "wire/wire.h"

namespace livemig {

namespace {

using wire::CheckHeader;
using wire::EncodedBatch;
using wire::Header;
using wire::kHeaderBytes;
using wire::kMaxBatchPages;
using wire::kPages;
using wire::kPagesEnc;
using wire::kPageSize;
using wire::ReadResult;
using wire::SendCounts;
using wire::SendPagesJob;
using wire::Sink;

// A direction's {key, salt} from JavaScript (the TLS exporter's, src/security/tls.ts).
DirectionKey KeyOf(Napi::Env env, Napi::Value v) {
  if (!v.IsObject()) throw Napi::TypeError::New(env, "keys must be {send: {key, salt}, receive: {key, salt}}");
  Napi::Object o = v.As<Napi::Object>();
  Napi::Value key = o.Get("key"), salt = o.Get("salt");
  if (!key.IsBuffer() || !salt.IsBuffer() || key.As<Napi::Buffer<uint8_t>>().Length() != kAeadKeyBytes ||
      salt.As<Napi::Buffer<uint8_t>>().Length() != kAeadSaltBytes) {
    throw Napi::RangeError::New(env, "a direction's key must be 32 bytes and its salt 4");
  }
  DirectionKey d;
  std::memcpy(d.key, key.As<Napi::Buffer<uint8_t>>().Data(), kAeadKeyBytes);
  std::memcpy(d.salt, salt.As<Napi::Buffer<uint8_t>>().Data(), kAeadSaltBytes);
  return d;
}

class Wire : public Napi::ObjectWrap<Wire> {
 public:
  static Napi::Function Init(Napi::Env env) {
    return DefineClass(env, "Wire",
                       {InstanceMethod("write", &Wire::Write), InstanceMethod("sendPages", &Wire::SendPages), InstanceMethod("read", &Wire::Read),
                        InstanceMethod("shutdown", &Wire::Shutdown), InstanceMethod("close", &Wire::Close), InstanceMethod("setTimeouts", &Wire::SetTimeouts),
                        InstanceMethod("finish", &Wire::Finish), InstanceMethod("peerGone", &Wire::PeerGone), InstanceMethod("sendEncoded", &Wire::SendEncoded),
                        InstanceMethod("fd", &Wire::GetFd), InstanceMethod("forget", &Wire::Forget), InstanceMethod("writeNow", &Wire::WriteNow),
                        InstanceMethod("readNow", &Wire::ReadNow), InstanceMethod("unread", &Wire::Unread)});
  }

  // new Wire(fd, keys?: {send: {key, salt}, receive: {key, salt}}): takes a duplicate of a
  // connected TCP socket's descriptor; the caller closes its own. The duplicate is made
  // blocking: the threads that use it wait in the kernel. With keys, every byte either way is
  // in AEAD records from the first frame on (io/records.h).
  explicit Wire(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Wire>(info) {
    Napi::Env env = info.Env();
    int fd = fcntl(info[0].As<Napi::Number>().Int32Value(), F_DUPFD_CLOEXEC, 3);
    if (fd < 0) throw MakeSysError(env, "fcntl(F_DUPFD_CLOEXEC)", errno);
    link_ = std::make_shared<Link>(fd);
    if (info[1].IsObject()) {
      Napi::Object k = info[1].As<Napi::Object>();
      DirectionKey send = KeyOf(env, k.Get("send")), receive = KeyOf(env, k.Get("receive"));
      Napi::Value r = k.Get("received");
      const int64_t received = r.IsNumber() ? r.As<Napi::Number>().Int64Value() : 0;
      if (received < 0) throw Napi::RangeError::New(env, "keys.received must be a count of records");
      SysError err;
      if (!link_->Encrypt(send, receive, static_cast<uint64_t>(received), err)) throw MakeSysError(env, err);
    }
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) < 0) throw MakeSysError(env, "fcntl(F_SETFL)", errno);
    int one = 1;
    // Frames are written whole; TCP_NODELAY keeps a lone control frame from waiting 40 ms
    // for an ACK. ENOTSUP (not TCP, e.g. a socketpair in tests) is harmless.
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) != 0 && errno != EOPNOTSUPP && errno != ENOPROTOOPT) {
      throw MakeSysError(env, "setsockopt(TCP_NODELAY)", errno);
    }
  }

 private:
  // Each frame type's payload limit (limits[type]), maxPayload for a type without one.
  static std::vector<uint32_t> LimitsOf(Napi::Object o, uint32_t maxType, uint32_t maxPayload) {
    std::vector<uint32_t> limits(maxType + 1, maxPayload);
    Napi::Value v = o.Get("limits");
    if (v.IsTypedArray()) {
      Napi::Uint32Array a = v.As<Napi::Uint32Array>();
      for (size_t t = 0; t < a.ElementLength() && t <= maxType; t++) limits[t] = std::min(a[t], maxPayload);
    }
    return limits;
  }

  std::shared_ptr<Link> Live(Napi::Env env) {
    if (!link_) throw Napi::Error::New(env, "the wire is closed");
    return link_;
  }

  // write(buffers: Buffer[]) -> Promise<void>
  Napi::Value Write(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto fd = Live(env);
    Napi::Array arr = info[0].As<Napi::Array>();
    std::vector<iovec> iov;
    std::vector<Napi::Value> keep{info[0]};
    for (uint32_t i = 0; i < arr.Length(); i++) {
      Napi::Buffer<uint8_t> b = arr.Get(i).As<Napi::Buffer<uint8_t>>();
      if (b.Length() > 0) iov.push_back({b.Data(), b.Length()});
    }
    return Task<int>::Start(
        env, [fd, iov](int&, SysError& err) mutable { fd->Send(iov.data(), static_cast<int>(iov.size()), 0, err); },
        [](Napi::Env e, int&) -> Napi::Value { return e.Undefined(); }, keep);
  }

  // writeNow(parts: Buffer[]) -> bytes the kernel took at once, on the calling thread, without
  // waiting (0 when the socket buffer is full). For small control frames inside a pause, where
  // a hop through the thread pool and back costs more than the send; the caller queues the
  // rest, if any, behind it. Encrypted, the frame is sealed whole and -1 means part of its
  // record waits here: the caller queues a write (of nothing, if need be) to send it.
  Napi::Value WriteNow(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto fd = Live(env);
    Napi::Array arr = info[0].As<Napi::Array>();
    std::vector<iovec> iov;
    for (uint32_t i = 0; i < arr.Length(); i++) {
      Napi::Buffer<uint8_t> b = arr.Get(i).As<Napi::Buffer<uint8_t>>();
      if (b.Length() > 0) iov.push_back({b.Data(), b.Length()});
    }
    if (iov.empty()) return Napi::Number::New(env, 0);
    if (fd->encrypted()) {
      bool waiting = false;
      SysError err;
      if (!fd->tx()->SendNow(fd->fd(), iov.data(), static_cast<int>(iov.size()), waiting, err)) throw MakeSysError(env, err);
      size_t total = 0;
      for (auto& v : iov) total += v.iov_len;
      return Napi::Number::New(env, waiting ? -1.0 : static_cast<double>(total));
    }
    msghdr msg{};
    msg.msg_iov = iov.data();
    msg.msg_iovlen = std::min(static_cast<int>(iov.size()), kMaxIov);
    for (;;) {
      ssize_t n = sendmsg(fd->fd(), &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (n >= 0) return Napi::Number::New(env, static_cast<double>(n));
      if (errno == EINTR) continue;                                                   // interrupted before any byte: again
      if (errno == EAGAIN || errno == EWOULDBLOCK) return Napi::Number::New(env, 0);  // full: queue it
      throw MakeSysError(env, "sendmsg", errno);                                      // EPIPE, ECONNRESET: the connection is gone
    }
  }

  // sendPages({region, pages: Uint32Array, round, version, batchPages, hashes, dedup?, flags,
  //            now}) -> Promise<{bytes, zero, dup, skipped, raw,
  //            overheadMs, indexMs}>: see wire/send_pages.h. `now`: on the calling thread (a
  // few pages inside the pause; see Task::RunNow).
  Napi::Value SendPages(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Object o = info[0].As<Napi::Object>();
    SendPagesJob job;
    job.link = Live(env);
    job.scratch = sendScratch_;
    Napi::Value regionValue = o.Get("region");
    job.m = Region::Unwrap(regionValue.As<Napi::Object>())->LiveMapping(env);
    if (!job.m) return env.Undefined();
    Napi::Uint32Array pages = o.Get("pages").As<Napi::Uint32Array>();
    Napi::BigUint64Array hashes = o.Get("hashes").As<Napi::BigUint64Array>();
    job.round = o.Get("round").As<Napi::Number>().Uint32Value();
    job.version = static_cast<uint8_t>(o.Get("version").As<Napi::Number>().Uint32Value());
    job.batchPages = o.Get("batchPages").As<Napi::Number>().Uint32Value();
    job.pageCount = job.m->size / kPageSize;
    if (job.batchPages == 0 || job.batchPages > kMaxBatchPages) throw Napi::RangeError::New(env, "batchPages must be 1..4096");
    if (hashes.ElementLength() < job.pageCount) throw Napi::RangeError::New(env, "hash table smaller than the region");
    job.idx = pages.Data();
    job.count = pages.ElementLength();
    for (size_t k = 0; k < job.count; k++) {
      if (job.idx[k] >= job.pageCount) throw Napi::RangeError::New(env, "page index outside the region");
      // every frame's indices strictly increase (wire/format.h): so must the list they are cut from
      if (k > 0 && job.idx[k] <= job.idx[k - 1]) throw Napi::RangeError::New(env, "page indices must be strictly increasing");
    }
    job.hashes = hashes.Data();
    Napi::Value dedupValue = o.Get("dedup");
    job.dedup = dedupValue.IsObject() ? &Dedup::Unwrap(dedupValue.As<Napi::Object>())->state : nullptr;
    if (job.dedup && job.dedup->holder.size() != job.pageCount) throw Napi::RangeError::New(env, "dedup index does not match the region");
    Napi::Value flags = o.Get("flags");
    job.flags = flags.IsNumber() ? flags.As<Napi::Number>().Uint32Value() : 0;
    if (job.flags && !job.dedup) throw Napi::TypeError::New(env, "encoded frames need the dedup index");
    const bool now = o.Get("now").ToBoolean().Value();
    job.m->Ref();
    auto work = [job](SendCounts& c, SysError& err) {
      wire::SendPages(job, c, err);
      job.m->Unref();
    };
    auto done = [](Napi::Env e, SendCounts& c) -> Napi::Value {
      Napi::Object r = Napi::Object::New(e);
      r.Set("bytes", c.bytes);
      r.Set("zero", c.zero);
      r.Set("dup", c.dup);
      r.Set("skipped", c.skipped);
      r.Set("raw", c.raw);
      r.Set("overheadMs", c.overheadMs);
      r.Set("indexMs", c.indexMs);
      return r;
    };
    // the request object holds the region, pages, hashes and dedup alive until the work is done
    return now ? Task<SendCounts>::RunNow(env, work, done) : Task<SendCounts>::Start(env, work, done, {o});
  }

  // sendEncoded({pages, encodings: Uint8Array, staging: Buffer, lz4: Buffer, lengths: Int32Array,
  //              hashes, round, version}) -> Promise<number>
  // One PAGES_ENC frame for a classified batch: skipped pages are left out; raw bodies come
  // from staging[k*pageSize], lz4 bodies from lz4[k*pageSize] (lengths[k] bytes), dup bodies
  // are the page's content hash and the source page lengths[k]. Resolves to the bytes written
  // (0 if every page was skipped).
  Napi::Value SendEncoded(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto fd = Live(env);
    Napi::Object o = info[0].As<Napi::Object>();
    Napi::Uint32Array pages = o.Get("pages").As<Napi::Uint32Array>();
    Napi::Uint8Array enc = o.Get("encodings").As<Napi::Uint8Array>();
    Napi::Buffer<uint8_t> staging = o.Get("staging").As<Napi::Buffer<uint8_t>>();
    Napi::Buffer<uint8_t> lz4 = o.Get("lz4").As<Napi::Buffer<uint8_t>>();
    Napi::Int32Array lens = o.Get("lengths").As<Napi::Int32Array>();
    Napi::BigUint64Array hashes = o.Get("hashes").As<Napi::BigUint64Array>();
    uint32_t round = o.Get("round").As<Napi::Number>().Uint32Value();
    uint8_t version = static_cast<uint8_t>(o.Get("version").As<Napi::Number>().Uint32Value());
    size_t n = pages.ElementLength();
    if (enc.ElementLength() != n || staging.Length() < n * kPageSize || lz4.Length() < n * kPageSize || lens.ElementLength() < n)
      throw Napi::RangeError::New(env, "sendEncoded buffers do not match the batch");
    const uint32_t* idx = pages.Data();
    for (size_t k = 0; k < n; k++) {
      if (idx[k] >= hashes.ElementLength()) throw Napi::RangeError::New(env, "page index outside the hash table");
      if (k > 0 && idx[k] <= idx[k - 1]) throw Napi::RangeError::New(env, "page indices must be strictly increasing");
      if (enc.Data()[k] == kLz4) {
        size_t g = 1;
        while (k + g < n && enc.Data()[k + g] == kLz4Cont) g++;
        if (g > kMaxLz4Group || lens.Data()[k] < 4 || static_cast<size_t>(lens.Data()[k]) > g * kPageSize)
          throw Napi::RangeError::New(env, "lz4 length out of range");
      }
      if (enc.Data()[k] == kLz4Cont && (k == 0 || (enc.Data()[k - 1] != kLz4 && enc.Data()[k - 1] != kLz4Cont)))
        throw Napi::RangeError::New(env, "lz4 continuation without its block");
      if (enc.Data()[k] == kDup && (lens.Data()[k] < 0 || static_cast<size_t>(lens.Data()[k]) >= hashes.ElementLength()))
        throw Napi::RangeError::New(env, "dup source page out of range");
    }
    EncodedBatch batch;
    batch.idx = idx;
    batch.enc = enc.Data();
    batch.staging = staging.Data();
    batch.lz4 = lz4.Data();
    batch.lengths = lens.Data();
    batch.hashes = hashes.Data();
    batch.count = n;
    batch.round = round;
    batch.version = version;
    return Task<double>::Start(
        env, [fd, batch](double& bytes, SysError& err) { SendEncodedBatch(*fd, batch, bytes, err); },
        [](Napi::Env env2, double& bytes) -> Napi::Value { return Napi::Number::New(env2, bytes); }, {o, pages, enc, staging, lz4, lens, hashes});
  }

  // read({maxPayload, maxType, limits?: Uint32Array (max payload per frame type), sink?: {region,
  //   hashes, version, maxBatchPages}}) -> Promise<{version, type, flags, payload: Buffer, pages,
  //   batches, bytes, lastRound }>
  // Without a sink, returns the next frame. With one, receives PAGES frames into the region
  // until another frame arrives, and returns that one with counts of what was applied.
  Napi::Value Read(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto fd = Live(env);
    Napi::Object o = info[0].As<Napi::Object>();
    uint32_t maxPayload = o.Get("maxPayload").As<Napi::Number>().Uint32Value();
    uint32_t maxType = o.Get("maxType").As<Napi::Number>().Uint32Value();
    std::vector<uint32_t> limits = LimitsOf(o, maxType, maxPayload);
    Sink sink;
    std::vector<Napi::Value> keep{o};
    Napi::Value sv = o.Get("sink");
    if (sv.IsObject()) {
      Napi::Object so = sv.As<Napi::Object>();
      sink.m = Region::Unwrap(so.Get("region"))->LiveMapping(env);
      if (!sink.m) return env.Undefined();
      Napi::BigUint64Array hashes = so.Get("hashes").As<Napi::BigUint64Array>();
      sink.pageCount = sink.m->size / kPageSize;
      if (hashes.ElementLength() < sink.pageCount) throw Napi::RangeError::New(env, "hash table smaller than the region");
      sink.hashes = hashes.Data();
      sink.version = static_cast<uint8_t>(so.Get("version").As<Napi::Number>().Uint32Value());
      sink.maxBatchPages = so.Get("maxBatchPages").As<Napi::Number>().Uint32Value();
      if (so.Get("encodings").ToBoolean()) sink.order = order_.get();
      Napi::Value channels = so.Get("channels");
      if (channels.IsNumber()) {
        sink.channels = channels.As<Napi::Number>().Uint32Value();
        sink.channel = so.Get("channel").As<Napi::Number>().Uint32Value();
        if (sink.channels < 1 || sink.channels > wire::kMaxChannels || sink.channel >= sink.channels)
          throw Napi::RangeError::New(env, "sink channel outside its channels");
      }
      sink.m->Ref();
    }
    auto order = order_;
    auto scratch = receiveScratch_;
    return Task<ReadResult>::Start(
        env,
        [fd, maxPayload, maxType, limits, sink, order, scratch](ReadResult& r, SysError& err) {
          std::vector<uint32_t>& idx = scratch->idx;
          std::vector<iovec>& iov = scratch->iov;
          std::vector<uint8_t>& body = scratch->body;
          for (;;) {
            uint8_t h[kHeaderBytes];
            if (!fd->RecvBytes(h, kHeaderBytes, true, err)) break;
            Header hd;
            if (!CheckHeader(h, maxPayload, hd, err)) break;
            if (hd.type > maxType) {
              err.fail("ERR_LIVEMIG_PROTOCOL", "unknown frame type " + std::to_string(hd.type));
              break;
            }
            const uint8_t version = hd.version, type = hd.type;
            const uint16_t flags = hd.flags;
            const uint32_t length = hd.length;
            if (type == kPages && sink.m) {
              if (!ReceivePages(*fd, sink, version, length, r, idx, iov, body, err)) break;
              continue;
            }
            if (type == kPagesEnc && sink.m) {
              if (!ReceiveEncoded(*fd, sink, version, length, r, idx, body, err)) break;
              continue;
            }
            if (length > limits[type]) {
              err.fail("ERR_LIVEMIG_FRAME_TOO_LARGE", "frame of type " + std::to_string(type) + " announces " + std::to_string(length) +
                                                          " payload bytes (max " + std::to_string(limits[type]) + " for its type)");
              break;
            }
            r.version = version;
            r.type = type;
            r.flags = flags;
            r.payload = new std::vector<uint8_t>();
            // the buffer grows as bytes arrive: a header alone cannot make us hold its length
            for (size_t got = 0; got < length && !err.failed();) {
              size_t step = std::min<size_t>(length - got, std::max<size_t>(64 * 1024, got));
              r.payload->resize(got + step);
              if (fd->RecvBytes(r.payload->data() + got, step, false, err)) got += step;
            }
            break;
          }
          if (err.failed() && r.payload) {
            delete r.payload;
            r.payload = nullptr;
          }
          if (sink.m) sink.m->Unref();
        },
        [](Napi::Env e, ReadResult& r) -> Napi::Value {
          Napi::Object out = Napi::Object::New(e);
          out.Set("version", r.version);
          out.Set("type", r.type);
          out.Set("flags", r.flags);
          std::vector<uint8_t>* p = r.payload;
          r.payload = nullptr;
          out.Set("payload", p->empty() ? (delete p, Napi::Buffer<uint8_t>::New(e, 0))
                                        : Napi::Buffer<uint8_t>::New(
                                              e, p->data(), p->size(), [](Napi::Env, uint8_t*, std::vector<uint8_t>* v) { delete v; }, p));
          out.Set("pages", r.pages);
          out.Set("batches", r.batches);
          out.Set("bytes", r.bytes);
          out.Set("lastRound", static_cast<double>(r.lastRound));
          return out;
        },
        keep);
  }

  // readNow({maxPayload, maxType}) -> a frame, or null: a whole control frame (not pages, at
  // most 64 KiB) that is already in the socket buffer, read on the calling thread. Anything
  // else (not all there yet, pages, a header read() would refuse) returns null and is left
  // for read(), which waits, applies pages and reports errors. Inside a pause, a frame that
  // has arrived needs no hop through the thread pool.
  Napi::Value ReadNow(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto fd = Live(env);
    Napi::Object o = info[0].As<Napi::Object>();
    uint32_t maxPayload = std::min<uint32_t>(o.Get("maxPayload").As<Napi::Number>().Uint32Value(), 64 * 1024);
    uint32_t maxType = o.Get("maxType").As<Napi::Number>().Uint32Value();
    std::vector<uint32_t> limits = LimitsOf(o, maxType, maxPayload);
    if (fd->encrypted()) return ReadNowSealed(env, *fd, maxPayload, maxType, limits);
    uint8_t h[kHeaderBytes];
    ssize_t n = recv(fd->fd(), h, kHeaderBytes, MSG_PEEK | MSG_DONTWAIT);
    if (n != static_cast<ssize_t>(kHeaderBytes)) return env.Null();  // EAGAIN, EOF, an error, or a partial header
    Header hd;
    SysError refused;  // read() reports it, with the stream position it needs
    if (!CheckHeader(h, maxPayload, hd, refused) || hd.type > maxType) return env.Null();
    const uint8_t version = hd.version, type = hd.type;
    const uint32_t length = hd.length;
    if (type == kPages || type == kPagesEnc || length > limits[type]) return env.Null();  // read() reports a frame over its limit
    int queued = 0;
    if (ioctl(fd->fd(), FIONREAD, &queued) != 0 || static_cast<uint64_t>(queued) < kHeaderBytes + static_cast<uint64_t>(length)) return env.Null();
    Napi::Buffer<uint8_t> payload = Napi::Buffer<uint8_t>::New(env, length);
    iovec iov[2] = {{h, kHeaderBytes}, {payload.Data(), length}};
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = length ? 2 : 1;
    ssize_t got;
    do got = recvmsg(fd->fd(), &msg, MSG_DONTWAIT);
    while (got < 0 && errno == EINTR);
    // FIONREAD said it is all there and only this thread reads now: anything short is a broken
    // connection, which the next read() reports
    if (got != static_cast<ssize_t>(kHeaderBytes + length)) throw MakeSysError(env, "recvmsg", got < 0 ? errno : EPROTO, "a buffered frame came short");
    return ControlFrame(env, version, type, Le16(h + 4), payload);
  }

  static Napi::Object ControlFrame(Napi::Env env, uint8_t version, uint8_t type, uint16_t flags, Napi::Buffer<uint8_t> payload) {
    Napi::Object out = Napi::Object::New(env);
    out.Set("version", version);
    out.Set("type", type);
    out.Set("flags", flags);
    out.Set("payload", payload);
    out.Set("pages", 0);
    out.Set("batches", 0);
    out.Set("bytes", 0);
    out.Set("lastRound", -1.0);
    return out;
  }

  // readNow on an encrypted stream: a record already in the socket buffer is opened into the
  // link's buffer, and a whole control frame there is taken from it.
  static Napi::Value ReadNowSealed(Napi::Env env, Link& link, uint32_t maxPayload, uint32_t maxType, const std::vector<uint32_t>& limits) {
    SysError err;
    RecordReceiver* rx = link.rx();
    if (!rx->FillNow(link.fd(), kHeaderBytes + maxPayload, err)) throw MakeSysError(env, err);
    if (rx->buffered() < kHeaderBytes) return env.Null();
    const uint8_t* h = rx->bufferedData();
    Header hd;
    SysError refused;  // read() reports it
    if (!CheckHeader(h, maxPayload, hd, refused) || hd.type > maxType || hd.type == kPages || hd.type == kPagesEnc || hd.length > limits[hd.type])
      return env.Null();
    if (rx->buffered() < kHeaderBytes + static_cast<size_t>(hd.length)) return env.Null();
    Napi::Buffer<uint8_t> payload = Napi::Buffer<uint8_t>::Copy(env, h + kHeaderBytes, hd.length);
    rx->Consume(kHeaderBytes + hd.length);
    return ControlFrame(env, hd.version, hd.type, hd.flags, payload);
  }

  // unread() -> bytes of the peer's that arrived and were not read yet: a connection whose
  // first frame must be answered before anything follows it is refused when this is not 0.
  Napi::Value Unread(const Napi::CallbackInfo& info) {
    long n = Live(info.Env())->Unread();
    if (n < 0) throw MakeSysError(info.Env(), "ioctl(FIONREAD)", errno);
    return Napi::Number::New(info.Env(), static_cast<double>(n));
  }

  // Wakes every thread blocked on this connection (they fail) and tells the peer we are gone.
  Napi::Value Shutdown(const Napi::CallbackInfo& info) {
    if (link_) shutdown(link_->fd(), SHUT_RDWR);  // ENOTCONN when the peer already left: nothing to undo
    return info.Env().Undefined();
  }

  // finish(timeoutMs) -> Promise<void>: a graceful close after our last frame. Sends FIN, then
  // reads and discards until the peer closes too (or the time is up), so the kernel never
  // answers unread data with a reset that could destroy the frame we just sent (an ERROR).
  Napi::Value Finish(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto fd = Live(env);
    double ms = info[0].As<Napi::Number>().DoubleValue();
    return Task<int>::Start(
        env,
        [fd, ms](int& peerClosed, SysError&) {
          SysError unsent;  // a record part that never left: the peer reports the frame it lacks
          if (fd->encrypted()) fd->tx()->Flush(fd->fd(), unsent);
          shutdown(fd->fd(), SHUT_WR);  // ENOTCONN if the peer already reset: nothing left to flush
          timespec t0;
          clock_gettime(CLOCK_MONOTONIC, &t0);
          static thread_local uint8_t sink[65536];
          for (;;) {
            timespec t;
            clock_gettime(CLOCK_MONOTONIC, &t);
            double left = ms - ((t.tv_sec - t0.tv_sec) * 1e3 + (t.tv_nsec - t0.tv_nsec) / 1e6);
            if (left <= 0) break;
            pollfd p{fd->fd(), POLLIN, 0};
            int r = poll(&p, 1, static_cast<int>(left) + 1);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) break;  // time is up (or poll failed): close anyway
            ssize_t n = recv(fd->fd(), sink, sizeof sink, MSG_DONTWAIT);
            if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
            if (n == 0) peerClosed = 1;  // its orderly close: it read everything we sent before ours
            if (n <= 0) break;           // EOF: the peer closed; or reset: nothing more to protect
          }
        },
        [](Napi::Env e, int& peerClosed) -> Napi::Value { return Napi::Boolean::New(e, peerClosed == 1); });
  }

  // peerGone() -> whether the peer has already closed or reset the connection (an end of stream
  // waits to be read, nothing before it), seen without reading: what it sends after this
  // cannot have been heard
  Napi::Value PeerGone(const Napi::CallbackInfo& info) {
    auto fd = Live(info.Env());
    if (fd->HasBuffered()) return Napi::Boolean::New(info.Env(), false);  // plaintext still to read
    uint8_t b;
    ssize_t n = recv(fd->fd(), &b, 1, MSG_PEEK | MSG_DONTWAIT);
    return Napi::Boolean::New(info.Env(), n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR));
  }

  // The descriptor, for a post-copy service that takes a dup of it (no read or write may be
  // left running on this Wire then).
  Napi::Value GetFd(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), Live(info.Env())->fd()); }

 public:
  std::shared_ptr<Link> link() const { return link_; }

 private:
  // Drops our reference without shutting the connection down: a post-copy service holds its
  // own dup of the descriptor and goes on using the connection.
  Napi::Value Forget(const Napi::CallbackInfo& info) {
    link_.reset();
    return info.Env().Undefined();
  }

  // Drops our reference; the descriptor closes when the last operation using it returns.
  Napi::Value Close(const Napi::CallbackInfo& info) {
    if (link_) shutdown(link_->fd(), SHUT_RDWR);
    link_.reset();
    return info.Env().Undefined();
  }

  // setTimeouts(recvMs, sendMs): 0 means wait forever. A receive that sees no byte for
  // recvMs fails with ERR_LIVEMIG_TIMEOUT.
  Napi::Value SetTimeouts(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    auto fd = Live(env);
    for (int i = 0; i < 2; i++) {
      double ms = info[i].As<Napi::Number>().DoubleValue();
      timeval tv{static_cast<time_t>(ms / 1000), static_cast<suseconds_t>(static_cast<int64_t>(ms) % 1000 * 1000)};
      if (setsockopt(fd->fd(), SOL_SOCKET, i == 0 ? SO_RCVTIMEO : SO_SNDTIMEO, &tv, sizeof tv) != 0) throw MakeSysError(env, "setsockopt(SO_*TIMEO)", errno);
    }
    return env.Undefined();
  }

  std::shared_ptr<Link> link_;
  // frame rules of incoming PAGES_ENC frames; used by one read at a time
  std::shared_ptr<FrameOrder> order_ = std::make_shared<FrameOrder>();
  // buffers kept for the connection's life (wire/send_pages.h, wire/receive_pages.h); the
  // receiving ones are used by one read at a time, as order_ is
  std::shared_ptr<wire::SendScratch> sendScratch_ = wire::NewSendScratch();
  std::shared_ptr<wire::ReceiveScratch> receiveScratch_ = std::make_shared<wire::ReceiveScratch>();
};

}  // namespace

// openStreamRecords({key, salt}, first, bytes) -> {plain, records, consumed}: the whole records
// at the front of `bytes` (one direction's stream, the first numbered `first`) opened; what is
// not a whole record yet is left. For the first frame of an accepted connection, read before its
// Wire exists (src/receiver/admit.ts). Throws ERR_LIVEMIG_AUTH or ERR_LIVEMIG_PROTOCOL.
Napi::Value OpenStreamRecordsJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const DirectionKey d = KeyOf(env, info[0]);
  const int64_t first = info[1].As<Napi::Number>().Int64Value();
  if (first < 0) throw Napi::RangeError::New(env, "first must be a record number");
  Napi::Buffer<uint8_t> bytes = info[2].As<Napi::Buffer<uint8_t>>();
  std::vector<uint8_t> plain;
  size_t consumed = 0;
  uint64_t records = 0;
  SysError err;
  if (!OpenStreamRecords(d, static_cast<uint64_t>(first), bytes.Data(), bytes.Length(), plain, consumed, records, err)) throw MakeSysError(env, err);
  Napi::Object out = Napi::Object::New(env);
  out.Set("plain", Napi::Buffer<uint8_t>::Copy(env, plain.data(), plain.size()));
  out.Set("records", static_cast<double>(records));
  out.Set("consumed", static_cast<double>(consumed));
  return out;
}

// checkFrameHeader(header: Buffer (12 bytes), maxPayload) -> {version, type, flags, length}:
// the wire's header rules (wire/format.cc) for a header read outside a Wire (a connection's
// first frame, src/receiver/admit.ts); throws what read() would.
Napi::Value CheckFrameHeader(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Buffer<uint8_t> b = info[0].As<Napi::Buffer<uint8_t>>();
  if (b.Length() < kHeaderBytes) throw Napi::RangeError::New(env, "a frame header is 12 bytes");
  Header hd;
  SysError err;
  if (!CheckHeader(b.Data(), info[1].As<Napi::Number>().Uint32Value(), hd, err)) throw MakeSysError(env, err);
  Napi::Object o = Napi::Object::New(env);
  o.Set("version", hd.version);
  o.Set("type", hd.type);
  o.Set("flags", hd.flags);
  o.Set("length", hd.length);
  return o;
}

void InitWire(Napi::Env env, Napi::Object exports) {
  exports.Set("Wire", Wire::Init(env));
  exports.Set("checkFrameHeader", Napi::Function::New(env, CheckFrameHeader));
  exports.Set("openStreamRecords", Napi::Function::New(env, OpenStreamRecordsJs));
}

std::shared_ptr<Link> LinkOfWire(Napi::Env env, Napi::Value wire) {
  if (!wire.IsObject()) throw Napi::TypeError::New(env, "expected a Wire");
  Wire* w = Wire::Unwrap(wire.As<Napi::Object>());
  std::shared_ptr<Link> l = w ? w->link() : nullptr;
  if (!l) throw Napi::Error::New(env, "the wire is closed");
  return l;
}

}  // namespace livemig
