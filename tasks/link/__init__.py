"""The room and the avatar session a job plays through, and where they come from.

Read from the ground up: `types` (the link's words), `tokens`, `avatar` (the avatar server's
HTTP client), `room` and `roomhold`, `stream` (the audio to the avatar), `quota` (the fleet's
session slots), `link` (one room with a listening avatar), `warm` (kept between jobs) and
`links` (warm or cold, for each job).
"""
