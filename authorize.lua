-- authorize.lua: Consul intention checks for the public listener of a meshgen sidecar.
--
-- For each new connection: read the client certificate's SPIFFE ID from its DER, then ask the
-- local agent (POST /v1/agent/connect/authorize) whether that identity may reach this service.
-- The call goes through core.httpclient, which yields, so a slow agent delays only the
-- connection that waits on it. Decisions are cached briefly. Any error is a deny.
--
-- Settings come from proc.meshgen_* variables that haproxy.cfg sets in its global section.
-- Only HAProxy's own Lua API is used: it runs unchanged on HAProxy 2.6 (Lua 5.3) and 2.8 (5.4).

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
-- The agent's answer, without a JSON library: only two fields matter and both are checked.

local function json_string(s)
    return '"' .. s:gsub('[%c"\\]', function(c) return string.format("\\u%04x", c:byte()) end) .. '"'
end

local JSON_ESCAPES = { ['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = " ", f = " ", n = " ", r = " ", t = " " }

-- The JSON string that starts at `pos` (its opening quote), decoded: Consul escapes `>` as
-- \u003e. Control characters become spaces, so that a reason stays one log line.
local function json_string_at(s, pos)
    local out, i = {}, pos + 1
    while i <= #s do
        local c = s:sub(i, i)
        if c == '"' then return table.concat(out) end
        if c == "\\" then
            local e = s:sub(i + 1, i + 1)
            if e == "u" then
                local code = tonumber(s:sub(i + 2, i + 5):match("^%x%x%x%x$") or "", 16)
                if not code then return nil end
                out[#out + 1] = code < 0x20 and " " or utf8.char(code)
                i = i + 6
            elseif JSON_ESCAPES[e] then
                out[#out + 1] = JSON_ESCAPES[e]
                i = i + 2
            else
                return nil
            end
        else
            out[#out + 1] = c:byte() < 0x20 and " " or c
            i = i + 1
        end
    end
    return nil
end

local function parse_decision(body)
    if type(body) ~= "string" or #body > 65536 then return nil end
    local authorized = body:match('"Authorized"%s*:%s*(%a+)')
    if authorized ~= "true" and authorized ~= "false" then return nil end
    local start = body:match('"Reason"%s*:%s*()"')
    local reason = start and json_string_at(body, start) or ""
    return authorized == "true", reason:sub(1, 200)
end

local function colon_hex(bin)
    if type(bin) ~= "string" or #bin == 0 or #bin > 64 then return "" end
    return (bin:gsub(".", function(c) return string.format("%02x:", c:byte()) end):sub(1, -2))
end

-- ------------------------------------------------------------------------------------------
-- Settings and the decision cache.

local settings
local cache, cache_count = {}, 0

local function load_settings(txn)
    local s = {
        service = txn:get_var("proc.meshgen_service"),
        trust_domain = txn:get_var("proc.meshgen_trust_domain"),
        url = txn:get_var("proc.meshgen_agent_url"),
        dst = txn:get_var("proc.meshgen_agent_dst"),
        timeout = tonumber(txn:get_var("proc.meshgen_timeout_ms")) or 500,
        ttl = (tonumber(txn:get_var("proc.meshgen_cache_ttl_ms")) or 0) / 1000,
        size = tonumber(txn:get_var("proc.meshgen_cache_size")) or 1000,
        grace = (tonumber(txn:get_var("proc.meshgen_grace_ms")) or 0) / 1000,
        token = nil,
    }
    local path = txn:get_var("proc.meshgen_token_file")
    if path then
        local file = io.open(path, "r")
        if not file then return nil, "cannot read the token file" end
        s.token = (file:read("*a") or ""):match("^%s*(.-)%s*$")
        file:close()
    end
    if not (s.service and s.url) then return nil, "proc.meshgen_* settings are missing" end
    return s
end

local function now()
    local t = core.now()
    return t.sec + t.usec / 1e6
end

local function remember(key, allowed, reason)
    if settings.ttl <= 0 and settings.grace <= 0 then return end
    if cache[key] == nil then
        if cache_count >= settings.size then
            -- Full: a flood of new identities must not grow memory. Start over.
            cache, cache_count = {}, 0
        end
        cache_count = cache_count + 1
    end
    cache[key] = { allowed = allowed, reason = reason, at = now() }
end

local function ask_agent(uri, serial)
    local body = '{"Target":' .. json_string(settings.service) .. ',"ClientCertURI":' ..
        json_string(uri) .. ',"ClientCertSerial":' .. json_string(serial) .. '}'
    local headers = {
        ["content-type"] = { "application/json" },
        ["content-length"] = { tostring(#body) },
    }
    if settings.token and settings.token ~= "" then headers["x-consul-token"] = { settings.token } end
    local ok, response = pcall(function()
        return core.httpclient():post {
            url = settings.url .. "/v1/agent/connect/authorize",
            dst = settings.dst, body = body, headers = headers, timeout = settings.timeout,
        }
    end)
    if not ok or type(response) ~= "table" then return nil, "agent unreachable" end
    if response.status ~= 200 then
        return nil, "agent answered " .. tostring(response.status or "nothing")
    end
    local allowed, reason = parse_decision(response.body)
    if allowed == nil then return nil, "agent answer unparsable" end
    return allowed, reason
end

local function decide(txn)
    if not settings then
        local loaded, why = load_settings(txn)
        if not loaded then return false, why end
        settings = loaded
    end
    local der = txn.f:ssl_c_der()
    -- HAProxy hands a certificate larger than its buffer (tune.bufsize) to Lua as nothing.
    -- Boolean fetches reach Lua as 0 or 1, and 0 is true in Lua.
    local used = txn.f:ssl_c_used()
    if (der == nil or der == "") and (used == true or used == 1) then
        return false, "client certificate too large"
    end
    local uri, why = spiffe_id(der)
    if not uri then return false, why end
    -- Capped in the log: a longer value would cut the access log line before authz= and reason=.
    txn:set_var("sess.meshgen_spiffe", #uri > 200 and uri:sub(1, 200) .. "..." or uri)
    -- The agent's authorize does not check the trust domain: our CA signs only ours, but a
    -- certificate of another mesh that chains to a listed root must not get in either.
    local domain = uri:match("^spiffe://([^/]+)/")
    if settings.trust_domain and domain ~= settings.trust_domain then
        return false, "client certificate is of trust domain " .. domain .. ", not this mesh's"
    end
    local serial = colon_hex(txn.f:ssl_c_serial())
    local key = uri .. "|" .. serial
    local cached = cache[key]
    if cached and now() - cached.at < settings.ttl then
        return cached.allowed, "cached: " .. cached.reason
    end
    -- Set before the call: if the inspect-delay runs out while the agent is silent, HAProxy
    -- aborts this action and the connection is refused with this decision and reason logged.
    txn:set_var("sess.meshgen_decision", "deny")
    txn:set_var("sess.meshgen_reason", "agent did not answer in time")
    local allowed, reason = ask_agent(uri, serial)
    if allowed == nil then
        if cached and cached.allowed and now() - cached.at < settings.ttl + settings.grace then
            return true, "grace (" .. reason .. "): " .. cached.reason
        end
        return false, reason
    end
    remember(key, allowed, reason)
    return allowed, reason
end

core.register_action("meshgen_authorize", { "tcp-req" }, function(txn)
    local ok, allowed, reason = pcall(decide, txn)
    if not ok then allowed, reason = false, "authorize.lua error" end
    txn:set_var("sess.meshgen_reason", reason or "")
    txn:set_var("sess.meshgen_decision", allowed and "allow" or "deny")
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
return { spiffe_id = spiffe_id, parse_decision = parse_decision, colon_hex = colon_hex }
