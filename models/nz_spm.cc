// nz_spm.cc — the C shim over libsentencepiece (see nz_spm.h).
//
// Every entry point catches all exceptions (std::bad_alloc from the library
// or from the standard containers) and turns them into NZ_E_* codes.

#include "nz_spm.h"

#include "nz_alloc.h"

#include <sentencepiece_processor.h>

#include <cstring>
#include <exception>
#include <new>
#include <string>
#include <string_view>
#include <vector>

struct nz_spm {
    sentencepiece::SentencePieceProcessor proc;
};

namespace {

int fail_status(nz_error *err, const char *what, const sentencepiece::util::Status &st) {
    return nz_fail(err, NZ_E_FORMAT, "sentencepiece %s: %s", what, st.error_message());
}

int fail_exception(nz_error *err, const char *what) {
    try {
        throw;
    } catch (const std::bad_alloc &) {
        return nz_fail(err, NZ_E_NOMEM, "sentencepiece %s: out of memory", what);
    } catch (const std::exception &e) {
        return nz_fail(err, NZ_E_FORMAT, "sentencepiece %s: %s", what, e.what());
    } catch (...) {
        return nz_fail(err, NZ_E_FORMAT, "sentencepiece %s: unknown exception", what);
    }
}

size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

} // namespace

extern "C" {

int nz_spm_load(const void *data, size_t size, nz_spm **out, nz_error *err) {
    if (!out) return nz_fail(err, NZ_E_INVALID_ARG, "sentencepiece load: NULL output");
    *out = nullptr;
    if (!data && size) return nz_fail(err, NZ_E_INVALID_ARG, "sentencepiece load: NULL data");
    nz_spm *sp = nullptr;
    try {
        sp = new nz_spm;
        std::string_view bytes(data ? static_cast<const char *>(data) : "", size);
        const auto st = sp->proc.LoadFromSerializedProto(bytes);
        if (!st.ok()) {
            int rc = fail_status(err, "load (not a valid model)", st);
            delete sp;
            return rc;
        }
        if (sp->proc.GetPieceSize() <= 0) {
            delete sp;
            return nz_fail(err, NZ_E_FORMAT, "sentencepiece load: model has no pieces");
        }
    } catch (...) {
        delete sp;
        return fail_exception(err, "load");
    }
    *out = sp;
    return NZ_OK;
}

void nz_spm_free(nz_spm *sp) { delete sp; }

size_t nz_spm_piece_count(const nz_spm *sp) {
    if (!sp) return 0;
    int n = sp->proc.GetPieceSize();
    return n > 0 ? (size_t)n : 0;
}

int32_t nz_spm_unk_id(const nz_spm *sp) { return sp ? sp->proc.unk_id() : 0; }

int32_t nz_spm_piece_to_id(const nz_spm *sp, const char *piece, size_t len) {
    if (!sp) return 0;
    try {
        return sp->proc.PieceToId(std::string_view(piece ? piece : "", piece ? len : 0));
    } catch (...) {
        return sp->proc.unk_id();
    }
}

const char *nz_spm_id_to_piece(const nz_spm *sp, int32_t id, size_t *len) {
    if (len) *len = 0;
    if (!sp || id < 0 || id >= sp->proc.GetPieceSize()) return nullptr;
    try {
        const std::string &s = sp->proc.IdToPiece(id); // a reference into the loaded model
        if (len) *len = s.size();
        return s.c_str();
    } catch (...) {
        return nullptr;
    }
}

int nz_spm_encode(const nz_spm *sp, const char *text, size_t len, nz_spm_pieces **out, nz_error *err) {
    if (!out) return nz_fail(err, NZ_E_INVALID_ARG, "sentencepiece encode: NULL output");
    *out = nullptr;
    if (!sp || (!text && len)) return nz_fail(err, NZ_E_INVALID_ARG, "sentencepiece encode: NULL argument");
    try {
        sentencepiece::ImmutableSentencePieceText spt;
        const auto st = sp->proc.Encode(std::string_view(text ? text : "", len), spt.mutable_proto());
        if (!st.ok()) return fail_status(err, "encode", st);
        const size_t n = spt.pieces_size();
        size_t bytes = 0;
        for (size_t i = 0; i < n; i++) bytes += spt.pieces((int)i).piece().size() + 1;
        // one block: header | piece pointers | lengths | ids | piece bytes
        const size_t o_ptr = align_up(sizeof(nz_spm_pieces), alignof(const char *));
        const size_t o_len = align_up(o_ptr + n * sizeof(const char *), alignof(size_t));
        const size_t o_id = align_up(o_len + n * sizeof(size_t), alignof(int32_t));
        const size_t o_chr = o_id + n * sizeof(int32_t);
        unsigned char *blk = static_cast<unsigned char *>(nz_malloc(o_chr + bytes, NZ_MEM_OTHER));
        if (!blk) return nz_fail(err, NZ_E_NOMEM, "sentencepiece encode: out of memory");
        nz_spm_pieces *p = reinterpret_cast<nz_spm_pieces *>(blk);
        const char **ptr = reinterpret_cast<const char **>(blk + o_ptr);
        size_t *lens = reinterpret_cast<size_t *>(blk + o_len);
        int32_t *ids = reinterpret_cast<int32_t *>(blk + o_id);
        char *chr = reinterpret_cast<char *>(blk + o_chr);
        for (size_t i = 0; i < n; i++) {
            const auto piece = spt.pieces((int)i);
            const std::string &s = piece.piece();
            if (!s.empty()) std::memcpy(chr, s.data(), s.size());
            chr[s.size()] = '\0';
            ptr[i] = chr;
            lens[i] = s.size();
            ids[i] = (int32_t)piece.id();
            chr += s.size() + 1;
        }
        p->n = n;
        p->piece = ptr;
        p->len = lens;
        p->id = ids;
        *out = p;
        return NZ_OK;
    } catch (...) {
        return fail_exception(err, "encode");
    }
}

void nz_spm_pieces_free(nz_spm_pieces *p) { nz_free(p); }

int nz_spm_decode_pieces(const nz_spm *sp, const char *const *pieces, const size_t *lens, size_t n,
                         char **text, size_t *len, nz_error *err) {
    if (!text) return nz_fail(err, NZ_E_INVALID_ARG, "sentencepiece decode: NULL output");
    *text = nullptr;
    if (len) *len = 0;
    if (!sp || (!pieces && n)) return nz_fail(err, NZ_E_INVALID_ARG, "sentencepiece decode: NULL argument");
    try {
        std::vector<std::string_view> v;
        v.reserve(n);
        for (size_t i = 0; i < n; i++) {
            if (!pieces[i])
                return nz_fail(err, NZ_E_INVALID_ARG, "sentencepiece decode: piece %zu is NULL", i);
            v.emplace_back(pieces[i], lens ? lens[i] : std::strlen(pieces[i]));
        }
        std::string s;
        const auto st = sp->proc.Decode(v, &s);
        if (!st.ok()) return fail_status(err, "decode", st);
        char *t = static_cast<char *>(nz_malloc(s.size() + 1, NZ_MEM_OTHER));
        if (!t) return nz_fail(err, NZ_E_NOMEM, "sentencepiece decode: out of memory");
        if (!s.empty()) std::memcpy(t, s.data(), s.size());
        t[s.size()] = '\0';
        *text = t;
        if (len) *len = s.size();
        return NZ_OK;
    } catch (...) {
        return fail_exception(err, "decode");
    }
}

} // extern "C"
