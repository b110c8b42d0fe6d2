-- authorize.lua: who is calling, for the public listener of a meshgen sidecar.
--
-- For each new client certificate: read its SPIFFE ID from its DER, check its trust domain,
-- and hand haproxy.cfg the caller's partition/namespace/service, remembered by the certificate's digest
-- in callers.map so that its next connections need no script. haproxy.cfg looks the caller up
-- in the bundle's intentions.map, which meshgen renders from Consul's intentions: no call
-- leaves HAProxy, and every thread decides alike. Any error is a refusal, with its reason.
--
-- The trust domain comes from a proc.meshgen_* variable that haproxy.cfg sets in its global
-- section. Only HAProxy's own Lua API is used: it runs unchanged on Lua 5.3 and 5.4.

local MAX_DER = 16384      -- larger client certificates are refused unread
local MAX_URIS = 4         -- more URI SANs than this is malformed for our purpose

-- ------------------------------------------------------------------------------------------
-- DER: just enough to reach the URI entries of the SubjectAltName extension.

-- One TLV at `pos`: tag, first content byte, one past the last content byte.
local function tlv(der, pos, limit)
    if pos + 1 > limit then return nil end
    local tag, len = der:byte(pos), der:byte(pos + 1)
    local start = pos + 2
    if len >= 0x80 then
        local count = len - 0x80
        if count < 1 or count > 3 or start + count - 1 > limit then return nil end
        len = 0
        for i = 0, count - 1 do len = len * 256 + der:byte(start + i) end
        start = start + count
    end
    local finish = start + len
    if finish - 1 > limit then return nil end
    return tag, start, finish
end

-- The children of a constructed TLV, as {tag, start, finish} triples.
local function children(der, start, finish, max)
    local out, pos = {}, start
    while pos < finish do
        local tag, cstart, cfinish = tlv(der, pos, finish - 1)
        if not tag or #out >= max then return nil end
        out[#out + 1] = { tag, cstart, cfinish }
        pos = cfinish
    end
    return out
end

local SAN_OID = "\x55\x1d\x11" -- 2.5.29.17

-- Certificate -> tbsCertificate -> [3] extensions -> SAN -> GeneralNames -> [6] URIs.
local function uris_from_der(der)
    local limit = #der
    local tag, start, finish = tlv(der, 1, limit)
    if tag ~= 0x30 then return nil end
    local tbs_tag, tbs_start, tbs_finish = tlv(der, start, finish - 1)
    if tbs_tag ~= 0x30 then return nil end
    local fields = children(der, tbs_start, tbs_finish, 12)
    if not fields then return nil end
    for _, field in ipairs(fields) do
        if field[1] == 0xa3 then
            local seq_tag, seq_start, seq_finish = tlv(der, field[2], field[3] - 1)
            if seq_tag ~= 0x30 then return nil end
            local extensions = children(der, seq_start, seq_finish, 64)
            if not extensions then return nil end
            for _, ext in ipairs(extensions) do
                local parts = ext[1] == 0x30 and children(der, ext[2], ext[3], 3)
                if not parts or #parts < 2 then return nil end
                local oid = parts[1]
                if oid[1] == 0x06 and der:sub(oid[2], oid[3] - 1) == SAN_OID then
                    local value = parts[#parts]
                    if value[1] ~= 0x04 then return nil end
                    local names_tag, names_start, names_finish = tlv(der, value[2], value[3] - 1)
                    if names_tag ~= 0x30 then return nil end
                    local names = children(der, names_start, names_finish, 32)
                    if not names then return nil end
                    local uris = {}
                    for _, name in ipairs(names) do
                        if name[1] == 0x86 then
                            uris[#uris + 1] = der:sub(name[2], name[3] - 1)
                            if #uris > MAX_URIS then return nil end
                        end
                    end
                    return uris
                end
            end
            return {}
        end
    end
    return {}
end

-- The one SPIFFE ID of a client certificate, or nil and why not.
local function spiffe_id(der)
    if type(der) ~= "string" or #der == 0 then return nil, "no client certificate" end
    if #der > MAX_DER then return nil, "client certificate too large" end
    local ok, uris = pcall(uris_from_der, der)
    if not ok or uris == nil then return nil, "malformed client certificate" end
    if #uris ~= 1 then return nil, "client certificate has " .. #uris .. " URI SANs, want 1" end
    if not uris[1]:match("^spiffe://[%w%.%-]+/[%w%._~%%/%-]+$") then
        return nil, "client certificate URI is not a SPIFFE ID"
    end
    return uris[1]
end

-- ------------------------------------------------------------------------------------------
-- The caller, as intentions.map names it.

-- A name as meshgen.py's check_name accepts it: a caller whose name intentions.map could not
-- hold is refused, never decided by the line for unnamed callers.
local function plain_name(name)
    return #name <= 128 and name:match("^[%w][%w_%.%-]*$") ~= nil
end

-- "partition/namespace/service" of a service identity (a SPIFFE ID without a partition is of
-- "default"); nil for any other kind (agent, gateway, ...).
local function caller_of(uri)
    local partition = "default"
    local namespace, service = uri:match("^spiffe://[^/]+/ns/([^/]+)/dc/[^/]+/svc/([^/]+)$")
    if not namespace then
        partition, namespace, service = uri:match("^spiffe://[^/]+/ap/([^/]+)/ns/([^/]+)/dc/[^/]+/svc/([^/]+)$")
    end
    if not (namespace and plain_name(partition) and plain_name(namespace) and plain_name(service)) then
        return nil
    end
    return partition .. "/" .. namespace .. "/" .. service
end

-- Callers already identified, for haproxy.cfg to find by certificate digest without calling
-- this script (a call costs more than the rest of a decision): at most this many per thread.
local MAX_REMEMBERED = 10000
local remembered = 0

local function remember(txn, caller, uri)
    local digest, map = txn:get_var("sess.meshgen_cert"), txn:get_var("proc.meshgen_callers_map")
    if remembered < MAX_REMEMBERED and digest and map then
        core.set_map(map, digest, caller .. "|" .. uri)     -- adds the entry when missing
        remembered = remembered + 1
    end
end

local function identify(txn)
    local der = txn.f:ssl_c_der()
    -- HAProxy hands a certificate larger than its buffer (tune.bufsize) to Lua as nothing.
    -- Boolean fetches reach Lua as 0 or 1, and 0 is true in Lua.
    local used = txn.f:ssl_c_used()
    if (der == nil or der == "") and (used == true or used == 1) then
        return nil, "client certificate too large"
    end
    local uri, why = spiffe_id(der)
    if not uri then return nil, why end
    -- Capped in the log: a longer value would cut the access log line before authz= and reason=.
    txn:set_var("sess.meshgen_spiffe", #uri > 200 and uri:sub(1, 200) .. "..." or uri)
    -- Our CA signs only our trust domain, but a certificate of another mesh that chains to a
    -- listed root must not get in either; intentions do not name trust domains.
    local domain = uri:match("^spiffe://([^/]+)/")
    local trust_domain = txn:get_var("proc.meshgen_trust_domain")
    if trust_domain and domain ~= trust_domain then
        return nil, "client certificate is of trust domain " .. domain .. ", not this mesh's"
    end
    local caller = caller_of(uri)
    if not caller then return nil, "client certificate is not of a service with a plain name" end
    if #uri <= 200 then remember(txn, caller, uri) end
    return caller
end

core.register_action("meshgen_identify", { "tcp-req" }, function(txn)
    local ok, caller, why = pcall(identify, txn)
    if not ok then caller, why = nil, "authorize.lua error" end
    if caller then
        txn:set_var("sess.meshgen_caller", caller)
    else
        txn:set_var("sess.meshgen_refusal", why or "")
    end
end, 0)

-- ------------------------------------------------------------------------------------------
-- Outbound: HAProxy checks the upstream's chain but cannot pin its SPIFFE ID during the
-- handshake. This runs on the first response: the server's certificate must name one of the
-- services the upstream is for, or the connection is closed before a byte reaches the client.

local function server_service(der)
    local uri, why = spiffe_id(der)
    if not uri then return nil, why end
    local service = uri:match("^spiffe://[^/]+/ns/[^/]+/dc/[^/]+/svc/([^/]+)$")
        or uri:match("^spiffe://[^/]+/ap/[^/]+/ns/[^/]+/dc/[^/]+/svc/([^/]+)$")
    if not service then return nil, "server URI is not a service identity: " .. uri end
    return service, uri
end

core.register_action("meshgen_verify_upstream", { "tcp-res", "http-res" }, function(txn, expected)
    local ok, service, detail = pcall(server_service, txn.f:ssl_s_der())
    local allowed = false
    if ok and service then
        for name in expected:gmatch("[^,]+") do
            if name == service then allowed = true end
        end
    end
    txn:set_var("txn.meshgen_upstream_ok", allowed and 1 or 0)
    if not allowed then
        txn:Warning("meshgen: upstream identity mismatch: expected " .. expected .. ", server is " ..
            tostring(ok and (detail or service) or "unreadable") .. "; connection closed")
    end
end, 1)

-- Exposed for tests run by a plain Lua interpreter (tests/test_authorize_der.py).
return { spiffe_id = spiffe_id, caller_of = caller_of }
