-- POST /api/v1/login/access-token (OAuth2 password form) for a random seeded user per request.
local bodies = {}

function init(args)
  math.randomseed(os.time() + math.floor(os.clock() * 1000000))
  for line in io.lines(args[1]) do
    if #line > 0 then bodies[#bodies + 1] = line end
  end
end

function request()
  return wrk.format("POST", "/api/v1/login/access-token",
    { ["Content-Type"] = "application/x-www-form-urlencoded" }, bodies[math.random(#bodies)])
end

function done(summary, latency, requests)
  io.write(string.format("non2xx_or_errors=%d\n", summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
